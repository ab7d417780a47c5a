"""Tools that measure or judge the service but are not the service: ``bench`` (the engine
against the HF pipeline), ``bench --pipeline`` (the Kafka path alone), ``bench --service``
(the real ``run`` process through a broker) and ``eval`` (a labelled sample, before a
policy is deployed).

They live apart so that the running service never loads them: a benchmark may import the
HF pipeline, the admin client or a random-model builder that ``run`` has no use for, and a
change to a tool cannot alter what ``run`` does. The CLI imports a tool inside its command
function only; ``tests/test_layout.py`` fails if any other module of the package imports
this one.
"""
