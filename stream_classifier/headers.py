"""A consumed record's headers, whatever bytes their names hold.

Kafka allows any bytes in a header name, and producers built on librdkafka's C API write
such names. confluent-kafka decodes names as strict UTF-8 inside ``Message.headers()``:
one invalid name makes the call raise (``SystemError`` from a ``UnicodeDecodeError``) and
destroys the headers it failed to convert, so a second call returns garbage. Calling it
unguarded would stop the stream on a record anybody can publish.

:func:`read_headers` therefore reads the headers from librdkafka itself, before
confluent-kafka converts them: the message object keeps librdkafka's header list in a
field whose place is checked against the object's own topic, value and key pointers on
every call (a confluent-kafka with another layout is detected and the slower guarded path
is used instead). Names that are not UTF-8, or hold a NUL byte, are written on as their
backslash-escaped text (confluent-kafka's producer only takes text names, and cuts them at
the first NUL) and counted in one added header; values pass through byte for byte.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import confluent_kafka

log = logging.getLogger(__name__)

HEADER_PREFIX = "stream-classifier."
Headers = list[tuple[str, str | bytes | None]]

#: Added when names were escaped: how many (their bytes were not UTF-8).
ESCAPED_NAMES_HEADER = HEADER_PREFIX + "header-names-escaped"
#: Added when the headers could not be read at all: why.
UNREADABLE_HEADER = HEADER_PREFIX + "headers-unreadable"

_POINTER = ctypes.c_void_p
_WORD = ctypes.sizeof(_POINTER)
#: cimpl.Message after PyObject_HEAD: topic, value, key, headers (PyObject *), then
#: c_headers (rd_kafka_headers_t *).
_HEAD = 2 * _WORD
_TOPIC, _VALUE, _KEY, _PY_HEADERS, _C_HEADERS = (_HEAD + i * _WORD for i in range(5))


class _Librdkafka:
    """The two header calls of the librdkafka that confluent-kafka loaded."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.count = library.rd_kafka_header_cnt
        self.count.argtypes = [_POINTER]
        self.count.restype = ctypes.c_size_t
        self.get = library.rd_kafka_header_get_all
        self.get.argtypes = [
            _POINTER,
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(_POINTER),
            ctypes.POINTER(ctypes.c_size_t),
        ]
        self.get.restype = ctypes.c_int

    def headers(self, address: int) -> list[tuple[bytes, bytes | None]]:
        out: list[tuple[bytes, bytes | None]] = []
        name, value, size = ctypes.c_char_p(), _POINTER(), ctypes.c_size_t()
        for index in range(self.count(address)):
            if self.get(
                address, index, ctypes.byref(name), ctypes.byref(value), ctypes.byref(size)
            ):
                break
            data = None if value.value is None else ctypes.string_at(value.value, size.value)
            out.append((_whole_name(name, value, size), data))
        return out


def _whole_name(name: ctypes.c_char_p, value: ctypes.c_void_p, size: ctypes.c_size_t) -> bytes:
    """The name with any NUL bytes it holds: rd_kafka_header_get_all hands out a C string.

    librdkafka keeps the name at the end of its header struct, after the name's length and
    the value pointer: ``{ser_size, value_size, name_size, value, name[]}``. Where the words
    before the name match the value and size it returned, the stored length is read; else
    the name is taken up to its first NUL.
    """
    address = ctypes.cast(name, _POINTER).value
    if not address:
        return b""
    words = (ctypes.c_size_t * 4).from_address(address - 4 * _WORD)
    stored_value, value_size, name_size = words[3], words[1], words[2]
    if stored_value == (value.value or 0) and value_size == size.value:
        return ctypes.string_at(address, name_size)
    return name.value or b""


def librdkafka_path() -> str:
    """The librdkafka that confluent-kafka loaded: its wheel bundles one, else the system's."""
    package = Path(confluent_kafka.__file__).resolve().parent
    candidates = sorted((package.parent / "confluent_kafka.libs").glob("librdkafka*"))
    candidates += sorted(package.glob("librdkafka*"))
    return str(candidates[0]) if candidates else "librdkafka.so.1"


def _load() -> _Librdkafka | None:
    try:
        return _Librdkafka(ctypes.CDLL(librdkafka_path()))
    except (OSError, AttributeError) as exc:
        log.info("header names are read through confluent-kafka only (%s)", exc)
        return None


_RDKAFKA: _Librdkafka | None = (
    None if os.environ.get("STREAM_CLASSIFIER_NO_RAW_HEADERS") else _load()
)
_MESSAGE_TYPE: type = confluent_kafka.Message


def read_headers(message: Any) -> Headers:
    """The message's headers as ``(name, value)``; never raises."""
    if _RDKAFKA is not None and type(message) is _MESSAGE_TYPE:
        raw = _raw_headers(message, _RDKAFKA)
        if raw is not None:
            return _decoded(raw)
    return _guarded(message.headers)


def _raw_headers(message: Any, rdkafka: _Librdkafka) -> list[tuple[bytes, bytes | None]] | None:
    """librdkafka's header list of a cimpl.Message; None where the layout does not match."""
    address = id(message)

    def word(offset: int) -> int:
        return _POINTER.from_address(address + offset).value or 0

    if (word(_TOPIC), word(_VALUE), word(_KEY)) != (
        _address(message.topic()),
        _address(message.value()),
        _address(message.key()),
    ):
        return None
    if word(_PY_HEADERS):
        return None  # already converted by an earlier headers() call
    c_headers = word(_C_HEADERS)
    return rdkafka.headers(c_headers) if c_headers else []


def _address(field: object) -> int:
    """Where the message keeps this field: an absent key or value is a NULL pointer."""
    return 0 if field is None else id(field)


def _decoded(raw: list[tuple[bytes, bytes | None]]) -> Headers:
    headers: Headers = []
    escaped = 0
    for name, value in raw:
        try:
            text = name.decode("utf-8")
            if "\x00" in text:
                raise UnicodeDecodeError("utf-8", name, 0, 1, "NUL in a header name")
        except UnicodeDecodeError:
            text = name.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
            escaped += 1
        headers.append((text, value))
    if escaped:
        headers.append((ESCAPED_NAMES_HEADER, str(escaped).encode()))
    return headers


def _guarded(read: Callable[[], Any]) -> Headers:
    try:
        got = read() or []
        items = list(got.items() if isinstance(got, dict) else got)
        if all(isinstance(name, str) for name, _ in items):
            return items
        reason = "a header name could not be decoded"
    except Exception as exc:  # noqa: BLE001 - confluent-kafka raises SystemError here
        reason = f"{type(exc).__name__}: {exc.__cause__ or exc}"
    return [(UNREADABLE_HEADER, reason.encode("utf-8", "backslashreplace"))]
