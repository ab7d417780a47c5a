"""The real Schema Registry in tests: Apicurio started by deploy/registry/registry-local,
and a TCP relay in front of it that a test can cut (a registry outage on the wire)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def client(url: str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": url})


def avro_values(url: str, topic: str, schema: dict[str, Any], values: list[Any]) -> list[bytes]:
    """Values in the wire format, the schema registered under ``<topic>-value``."""
    writer = AvroSerializer(client(url), json.dumps(schema))
    ctx = SerializationContext(topic, MessageField.VALUE)
    return [_bytes(writer(value, ctx)) for value in values]


def read_avro(url: str, topic: str, value: bytes | None) -> Any:
    assert value is not None
    return AvroDeserializer(client(url))(value, SerializationContext(topic, MessageField.VALUE))


def _bytes(value: bytes | None) -> bytes:
    assert value is not None
    return value


class Relay:
    """Forwards TCP connections from a local port to the registry until :meth:`cut`:
    then every open connection is closed and new ones are closed at once, until
    :meth:`restore`."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cut_off = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def cut(self) -> None:
        with self._lock:
            self.cut_off = True
            for sock in self._open:
                _close(sock)
            self._open.clear()

    def restore(self) -> None:
        with self._lock:
            self.cut_off = False

    def close(self) -> None:
        self.cut()
        _close(self._server)

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                if self.cut_off:
                    _close(downstream)
                    continue
                try:
                    upstream = socket.create_connection(self._target, timeout=5)
                except OSError:
                    _close(downstream)
                    continue
                self._open += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
