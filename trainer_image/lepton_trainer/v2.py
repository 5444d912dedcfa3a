"""Open Inference Protocol v2 tensors: datatypes, the JSON and binary encodings, and
request validation against a model's signature, and what the server answers alike on
both APIs (its metadata, the model version, the errors). Pure (numpy, orjson): the REST and
gRPC front ends both use it, so both reject the same bad input with the same reason.

A tensor travels as a numpy array in the datatype's natural dtype, except ``BF16``,
which numpy lacks: its array is ``uint16`` holding the bfloat16 bit patterns, and
``BYTES``, an ``object`` array of ``bytes``.

Binary tensor extension (Triton's, over REST): the body is the JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw input tensors, in input
order, each of ``parameters.binary_data_size`` bytes. Fixed-size datatypes are
little-endian row-major; a ``BYTES`` element is a 4-byte little-endian length followed
by that many bytes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any, Iterable

import numpy as np
import orjson

NUMPY = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.uint16), "BYTES": np.dtype(object),
}
DATATYPES = tuple(NUMPY)
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_JSON_DEPTH = 64          # deeper JSON is rejected before it can exhaust the stack

# What the REST and gRPC front ends both answer: server metadata and the one model version.
SERVER_NAME = "lepton-serve"
PROTOCOL_VERSION = "2"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "model_repository"]
VERSION = "1"                # the model version every path and answer uses


class ProtocolError(ValueError):
    """Bad input: the message is the reason sent back (REST 400, gRPC INVALID_ARGUMENT)."""


class TooManyRows(ProtocolError):
    """A request with more rows than the server takes in one request (REST 413, gRPC
    RESOURCE_EXHAUSTED): the limit follows from the memory a row needs (serve.py)."""


class ModelFailed(RuntimeError):
    """The model raised on a request that passed validation (REST 500, gRPC INTERNAL)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A named input or output. ``shape`` includes the batch dimension first; -1 is any size."""
    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclasses.dataclass
class Request:
    inputs: dict[str, np.ndarray]
    outputs: list[str]                 # requested output names, in answer order
    binary: dict[str, bool]            # output name -> send as binary
    id: str | None
    rows: int
    timeout_us: int | None = None      # parameters.timeout (Triton's): the longest wait, in µs


def timeout_parameter(value: Any) -> int | None:
    """Triton's ``timeout`` request parameter (microseconds a request may wait; 0: none)."""
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ProtocolError(f"parameters.timeout must be a non-negative integer (microseconds), got {value!r}")
    return value or None


# --- dtype helpers ---------------------------------------------------------------------

def element_size(datatype: str) -> int:
    return NUMPY[datatype].itemsize


def from_numpy_dtype(dtype: np.dtype) -> str:
    for name, dt in NUMPY.items():
        if dt == dtype and name != "BF16":
            return name
    if dtype.kind in "SUO":
        return "BYTES"
    raise ValueError(f"no v2 datatype for numpy dtype {dtype}")


def serialize_bytes(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(buf: bytes | memoryview, count: int, name: str) -> np.ndarray:
    out, off, mv = [], 0, memoryview(buf)
    for _ in range(count):
        if off + 4 > len(mv):
            raise ProtocolError(f"input {name!r}: BYTES data ends inside an element length "
                                f"(expected {count} elements)")
        (n,) = struct.unpack_from("<I", mv, off)
        off += 4
        if off + n > len(mv):
            raise ProtocolError(f"input {name!r}: BYTES element of {n} bytes runs past the "
                                f"end of the tensor data")
        out.append(bytes(mv[off:off + n]))
        off += n
    if off != len(mv):
        raise ProtocolError(f"input {name!r}: {len(mv) - off} bytes left over after "
                            f"{count} BYTES elements (byte-size mismatch)")
    arr = np.empty(count, dtype=object)
    arr[:] = out
    return arr


def to_raw(arr: np.ndarray, datatype: str) -> bytes:
    """The binary (raw) encoding of a tensor."""
    if datatype == "BYTES":
        return serialize_bytes(arr)
    return np.ascontiguousarray(arr, dtype=NUMPY[datatype].newbyteorder("<")).tobytes()


def from_raw(buf: bytes | memoryview, datatype: str, shape: list[int], name: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buf, count, name).reshape(shape)
    want = count * element_size(datatype)
    if len(buf) != want:
        raise ProtocolError(f"input {name!r}: {len(buf)} bytes of binary data, but shape {shape} "
                            f"of {datatype} needs {want} (byte-size mismatch)")
    return np.frombuffer(buf, dtype=NUMPY[datatype].newbyteorder("<")).reshape(shape)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


# --- JSON --------------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ProtocolError(f"request body is not valid JSON: {name} is not a JSON number "
                        f"(NaN or infinite values cannot be sent as JSON)")


def _depth_ok(raw: bytes | str) -> bool:
    """True when brackets nest at most MAX_JSON_DEPTH deep (a cheap pre-scan, strings aware)."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return True
    depth, in_str, esc = 0, False, False
    for c in data:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif c in (0x5D, 0x7D):
            depth -= 1
    return True


def loads(raw: bytes | str) -> Any:
    """Strict JSON: no NaN/Infinity literals, nesting at most MAX_JSON_DEPTH."""
    if not _depth_ok(raw):
        raise ProtocolError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:                # orjson: the fast path; what it refuses, json reads or explains
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"request body is not valid JSON: {e}") from None


def _json_data(data: Any, datatype: str, shape: list[int], name: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = _flatten(data, name)
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"input {name!r}: BYTES data must be strings")
        arr = np.empty(len(flat), dtype=object)
        arr[:] = [v.encode() for v in flat]
    else:
        try:
            arr = np.asarray(data)
        except (ValueError, TypeError) as e:
            raise ProtocolError(f"input {name!r}: data is not a regular array of numbers: {e}") from None
        if arr.dtype == object:
            raise ProtocolError(f"input {name!r}: data is not a regular array of numbers")
        kind = arr.dtype.kind
        if datatype == "BOOL":
            if kind != "b" and arr.size:
                raise ProtocolError(f"input {name!r}: BOOL data must be true/false")
        elif datatype in ("FP16", "FP32", "FP64", "BF16"):
            if kind not in "iuf" and arr.size:
                raise ProtocolError(f"input {name!r}: data must be numbers ({datatype}), "
                                    f"got {kind!r}-kind values")
        else:
            if kind not in "iu" and arr.size:
                raise ProtocolError(f"input {name!r}: {datatype} data must be integers, "
                                    f"got {kind!r}-kind values")
            info = np.iinfo(NUMPY[datatype])
            if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
                raise ProtocolError(f"input {name!r}: values out of the {datatype} range")
        arr = arr.reshape(-1)
    if arr.size != count:
        raise ProtocolError(f"input {name!r}: data has {arr.size} values; shape {shape} needs {count}")
    if datatype == "BYTES":
        return arr.reshape(shape)
    if datatype == "BF16":
        f = arr.astype(np.float64)
        if not np.isfinite(f).all() or (np.abs(f) > 3.389e38).any():
            raise ProtocolError(f"input {name!r}: data contains NaN or infinite values "
                                f"(or values outside the BF16 range)")
        return float32_to_bf16(f.astype(np.float32)).reshape(shape)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(NUMPY[datatype]).reshape(shape)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise ProtocolError(f"input {name!r}: data contains NaN or infinite values "
                            f"(or values outside the {datatype} range)")
    return out


def _flatten(data: Any, name: str) -> list:
    out: list = []
    stack = [data]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))
        else:
            out.append(v)
    return out


# --- requests ----------------------------------------------------------------------------

def shape_matches(shape: list[int], spec: TensorSpec) -> bool:
    return len(shape) == len(spec.shape) and all(w == -1 or w == s for s, w in zip(shape, spec.shape))


def _check_shape(shape: Any, spec: TensorSpec, max_rows: int) -> list[int]:
    if (not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape)):
        raise ProtocolError(f"input {spec.name!r}: shape {shape!r} must be a non-empty list of "
                            f"non-negative integers")
    if not shape_matches(shape, spec) or shape[0] < 1:
        want = "[" + ", ".join("N" if i == 0 else ("*" if d == -1 else str(d))
                               for i, d in enumerate(spec.shape)) + "]"
        raise ProtocolError(f"input {spec.name!r}: shape {shape} does not match {want} with N >= 1")
    if shape[0] > max_rows:
        raise TooManyRows(f"request too large: {shape[0]} rows, the limit is {max_rows} rows per request")
    return shape


def parse_rest(body: bytes, header_length: int | None, inputs: list[TensorSpec],
               outputs: list[TensorSpec], max_rows: int) -> Request:
    """Validate a REST infer request (JSON, or JSON + binary tensors) against a signature."""
    if header_length is None:
        head, rest = body, b""
    else:
        if not 0 <= header_length <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {header_length} is outside the body of {len(body)} bytes")
        head, rest = body[:header_length], memoryview(body)[header_length:]
    req = loads(head)
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise ProtocolError("request body must be a JSON object with an 'inputs' list")
    req_id = req.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise ProtocolError(f"request 'id' must be a string, got {type(req_id).__name__}")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("request 'parameters' must be an object")
    specs = {s.name: s for s in inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for inp in req["inputs"]:
        if not isinstance(inp, dict):
            raise ProtocolError("each input must be an object with name, shape, datatype and data")
        name = inp.get("name")
        if name not in specs:
            raise ProtocolError(f"unknown input {name!r}; this model's inputs: {list(specs)}")
        if name in arrays:
            raise ProtocolError(f"input {name!r} appears twice")
        spec = specs[name]
        if inp.get("datatype") != spec.datatype:
            raise ProtocolError(f"input {name!r} has datatype {inp.get('datatype')!r}; "
                                f"this model takes {spec.datatype}")
        shape = _check_shape(inp.get("shape"), spec, max_rows)
        iparams = inp.get("parameters") or {}
        if not isinstance(iparams, dict):
            raise ProtocolError(f"input {name!r}: 'parameters' must be an object")
        size = iparams.get("binary_data_size")
        if size is not None:
            if "data" in inp:
                raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size")
            if type(size) is not int or size < 0:
                raise ProtocolError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(rest):
                raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the end of the "
                                    f"body ({len(rest) - offset} bytes left; byte-size mismatch)")
            arrays[name] = from_raw(rest[offset:offset + size], spec.datatype, shape, name)
            offset += size
        elif "data" in inp:
            arrays[name] = _json_data(inp["data"], spec.datatype, shape, name)
        else:
            raise ProtocolError(f"input {name!r} has no 'data' and no binary_data_size")
    if offset != len(rest):
        raise ProtocolError(f"{len(rest) - offset} bytes of binary data after the last input "
                            f"(byte-size mismatch)")
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise ProtocolError(f"missing inputs {missing}; this model's inputs: {list(specs)}")
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) != 1:
        raise ProtocolError(f"inputs disagree on the batch size (first dimension): {sorted(rows)}")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false")
    known = [o.name for o in outputs]
    wanted = req.get("outputs")
    binary: dict[str, bool] = {}
    if wanted is None:
        names = known
        binary = {n: default_binary for n in names}
    else:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
            raise ProtocolError("'outputs' must be a list of objects with a 'name'")
        names = [o.get("name") for o in wanted]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ProtocolError(f"unknown outputs {unknown}; known: {known}")
        for o in wanted:
            op = o.get("parameters") or {}
            if not isinstance(op, dict):
                raise ProtocolError(f"output {o['name']!r}: 'parameters' must be an object")
            if op.get("classification"):
                raise ProtocolError("the classification extension is not supported; ask for the "
                                    "'probabilities' or 'predicted_class' outputs instead")
            b = op.get("binary_data", default_binary)
            if not isinstance(b, bool):
                raise ProtocolError(f"output {o['name']!r}: binary_data must be true or false")
            binary[o["name"]] = b
    return Request(arrays, names, binary, req_id, rows.pop(), timeout_parameter(params.get("timeout")))


def parse_contents(name: str, datatype: str, shape: list[int], contents: Any) -> np.ndarray:
    """A gRPC ``InferTensorContents`` (typed repeated fields) as an array."""
    field = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}.get(datatype)
    if field is None:
        raise ProtocolError(f"input {name!r}: {datatype} must be sent in raw_input_contents")
    values = list(getattr(contents, field))
    count = math.prod(shape)
    if len(values) != count:
        raise ProtocolError(f"input {name!r}: {len(values)} values in {field}; shape {shape} needs {count}")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = values
        return arr.reshape(shape)
    arr = np.asarray(values, dtype=NUMPY[datatype]).reshape(shape)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ProtocolError(f"input {name!r}: data contains NaN or infinite values")
    return arr


def check_input(name: str, datatype: str, shape: Any, inputs: list[TensorSpec], max_rows: int) -> TensorSpec:
    specs = {s.name: s for s in inputs}
    if name not in specs:
        raise ProtocolError(f"unknown input {name!r}; this model's inputs: {list(specs)}")
    spec = specs[name]
    if datatype != spec.datatype:
        raise ProtocolError(f"input {name!r} has datatype {datatype!r}; this model takes {spec.datatype}")
    _check_shape(list(shape), spec, max_rows)
    return spec


def finite_or_raise(name: str, arr: np.ndarray, datatype: str) -> None:
    if datatype in ("FP16", "FP32", "FP64") and not np.isfinite(arr).all():
        raise ProtocolError(f"output {name!r} contains NaN or infinite values, which JSON cannot "
                            f"carry; request it with binary_data (binary tensor extension) or over gRPC")
    if datatype == "BF16" and not np.isfinite(bf16_to_float32(arr)).all():
        raise ProtocolError(f"output {name!r} contains NaN or infinite values, which JSON cannot "
                            f"carry; request it with binary_data (binary tensor extension) or over gRPC")


def json_data(arr: np.ndarray, datatype: str) -> list:
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in arr.reshape(-1)]
    if datatype == "BF16":
        return bf16_to_float32(arr).reshape(-1).tolist()
    return arr.reshape(-1).tolist()


def rest_response(model_name: str, model_version: str | None, req_id: str | None,
                  tensors: Iterable[tuple[str, str, np.ndarray]],
                  binary: dict[str, bool]) -> tuple[bytes, int | None]:
    """The REST infer response: (body, JSON header length when binary tensors follow)."""
    outs, blobs = [], []
    for name, datatype, arr in tensors:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary.get(name):
            raw = to_raw(arr, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            finite_or_raise(name, arr, datatype)
            entry["data"] = json_data(arr, datatype)
        outs.append(entry)
    payload: dict[str, Any] = {"model_name": model_name, "outputs": outs}
    if model_version:
        payload["model_version"] = model_version
    if req_id is not None:
        payload["id"] = req_id
    head = orjson.dumps(payload)         # the JSON outputs are finite (finite_or_raise)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
