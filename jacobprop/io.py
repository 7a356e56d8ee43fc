"""`save` and `load`: a network (and optionally its optimizer's state) in one `.npz`.

The file is a plain NumPy `.npz` (a zip of `.npy` arrays), read back with
`allow_pickle=False`, as safetensors does it: a JSON header plus raw arrays,
never code. Its entries:

- `__jacobprop__`: the header, UTF-8 JSON as a `uint8` array:
  `{"format": "jacobprop", "version": 1, "architecture": NODE,
  "params": {key: [dtype, shape]}, "state": {...}, "optimizer": {...} | null}`,
  where a NODE is `{"type": class name, "config": {...}}` and a config value
  that is a layer is `{"__layer__": NODE}` (Sequential's layers, Residual's
  block), recursively;
- `param/<key>`: every array of `net.params`, keyed as there;
- `state/<node>/<name>`: extra arrays a layer keeps outside `params`
  (BatchNorm's running statistics), `<node>` the layer's pre-order index in
  the architecture tree;
- `optim/<key>/<name>`: the optimizer state, when saved.

Layer classes are looked up by name in `jp.LAYERS` (and `Sequential`),
never imported from a name in the file, and rebuilt with `cls.from_config(config)`.

Extra state: a layer with arrays outside `params` overrides
`Layer.state_arrays() -> dict[str, ndarray]` and `Layer.load_state_arrays(arrays)`
(BatchNorm's running statistics); the defaults keep none.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .layers.base import LAYERS, Layer
from .network import Sequential
from .optim import Optimizer

__all__ = ["save", "load", "ModelFileError"]

FORMAT = "jacobprop"
VERSION = 1
HEADER = "__jacobprop__"
#: A header larger than this is not one we wrote (it would also be slow to parse).
_MAX_HEADER_BYTES = 64 * 2**20


class ModelFileError(ValueError):
    """A model file is corrupted, truncated, foreign, or does not match what it declares."""


# ---- save ------------------------------------------------------------------------------------
def save(net: Layer, path, *, optimizer: Optimizer | None = None) -> Path:
    """Write `net` (architecture, parameters, layer state) to `path` as one `.npz`.

    Parameters
    ----------
    net : Sequential or Layer
    path : str or os.PathLike
        Written exactly there (no suffix is added). The write is atomic: a
        temporary file in the same folder, then `os.replace`, so a crash
        leaves the old file or the new one, never half of one.
    optimizer : Optimizer, optional
        Also store its class, settings and state, so `load(path,
        optimizer=...)` can resume training.

    Returns
    -------
    pathlib.Path
    """
    if not isinstance(net, Layer):
        raise TypeError(f"save: `net` must be a jacobprop Layer, got {type(net).__name__}")
    path = Path(path)
    nodes: list[Layer] = []
    architecture = _encode_layer(net, nodes)
    arrays: dict[str, np.ndarray] = {}
    params_header = {}
    for key, value in net.params.items():
        arrays[f"param/{key}"] = value
        params_header[key] = [value.dtype.str, list(value.shape)]
    state_header = {}
    for index, layer in enumerate(nodes):
        for name, value in layer.state_arrays().items():
            value = np.asarray(value)
            arrays[f"state/{index}/{name}"] = value
            state_header[f"{index}/{name}"] = [value.dtype.str, list(value.shape)]
    optimizer_header = None
    if optimizer is not None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"save: `optimizer` must be a jacobprop Optimizer, got "
                            f"{type(optimizer).__name__}")
        if callable(optimizer.lr):
            raise ValueError("save: the optimizer's `lr` is a schedule (a callable), which a "
                             "file cannot hold; save without `optimizer`, or with a number")
        optimizer_header = {"type": type(optimizer).__name__, "config": optimizer.config(),
                            "steps": optimizer.steps, "state": {}}
        for key, named in optimizer.state.items():
            for name, value in named.items():
                arrays[f"optim/{key}/{name}"] = value
                optimizer_header["state"][f"{key}/{name}"] = [value.dtype.str,
                                                               list(value.shape)]
    for name, value in arrays.items():
        if value.dtype.hasobject:
            raise TypeError(f"save: array {name!r} has dtype object, which needs pickle")
    header = {"format": FORMAT, "version": VERSION, "architecture": architecture,
              "params": params_header, "state": state_header, "optimizer": optimizer_header}
    encoded = np.frombuffer(json.dumps(header, allow_nan=False).encode("utf-8"), np.uint8)
    _atomic_savez(path, {HEADER: encoded, **arrays})
    return path


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def _encode_layer(layer: Layer, nodes: list[Layer]) -> dict:
    """`{"type", "config"}` for `layer`, children encoded in place; `nodes` collects
    every layer in pre-order (its index names its state arrays)."""
    name = type(layer).__name__
    if _layer_classes().get(name) is not type(layer):
        raise TypeError(f"save: {name} is not a registered layer (jp.LAYERS), so load could "
                        "not rebuild it; decorate the class with @jp.register_layer")
    nodes.append(layer)
    return {"type": name, "config": _encode_value(layer.config(), nodes, name)}


def _encode_value(value, nodes, where):
    if isinstance(value, Layer):
        return {"__layer__": _encode_layer(value, nodes)}
    if isinstance(value, dict):
        return {str(k): _encode_value(v, nodes, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_value(v, nodes, where) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"save: {where}.config() holds {value!r} ({type(value).__name__}), which "
                    "is not a JSON value or a Layer")


def _layer_classes() -> dict[str, type]:
    return {**LAYERS, "Sequential": Sequential}


# ---- load ------------------------------------------------------------------------------------
def load(path, *, optimizer: Optimizer | None = None) -> Layer:
    """Rebuild the network saved at `path` (a `Sequential` when one was saved).

    Parameters
    ----------
    path : str or os.PathLike
    optimizer : Optimizer, optional
        Load the saved optimizer state into it (same class; its settings are
        replaced by the saved ones).

    Raises
    ------
    ModelFileError
        The file is not a zip/`.npz`, is truncated or corrupted, holds no
        jacobprop header (a foreign `.npz`), carries an object (pickle) array,
        names a layer not in `jp.LAYERS`, or its arrays do not match the
        architecture. Nothing in the file is ever executed.
    """
    path = Path(path)
    where = f"load({str(path)!r})"
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise ModelFileError(f"{where}: not a jacobprop model file (not a readable .npz "
                             f"archive: {error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ModelFileError(f"{where}: not a jacobprop model file (a single .npy array, "
                             "not an .npz archive)")
    with archive:
        arrays = _read_all(archive, where)
    header = _parse_header(arrays.pop(HEADER, None), where)
    try:
        return _rebuild(header, arrays, optimizer, where)
    except RecursionError:
        raise ModelFileError(f"{where}: the architecture is nested too deeply") from None
    except MemoryError:
        raise ModelFileError(f"{where}: the architecture asks for more memory than there "
                             "is (a layer config with absurd sizes?)") from None


def _read_all(archive, where) -> dict[str, np.ndarray]:
    arrays = {}
    for name in archive.files:
        try:
            arrays[name] = archive[name]
        except ValueError as error:
            if "allow_pickle" in str(error):
                raise ModelFileError(f"{where}: entry {name!r} is an object array, which only "
                                     "pickle can read; refused (a model file never needs "
                                     "pickle)") from None
            raise ModelFileError(f"{where}: entry {name!r} is corrupted ({error})") from None
        except (OSError, zipfile.BadZipFile, EOFError, KeyError) as error:
            raise ModelFileError(f"{where}: entry {name!r} is truncated or corrupted "
                                 f"({error})") from None
    return arrays


def _parse_header(raw, where) -> dict:
    if raw is None:
        raise ModelFileError(f"{where}: not a jacobprop model file (an .npz without the "
                             f"{HEADER!r} header entry)")
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _MAX_HEADER_BYTES:
        raise ModelFileError(f"{where}: the {HEADER!r} header must be UTF-8 bytes, got "
                             f"dtype {raw.dtype} shape {raw.shape}")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ModelFileError(f"{where}: the header is not valid JSON ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{where}: the header does not declare format {FORMAT!r}")
    if header.get("version") != VERSION:
        raise ModelFileError(f"{where}: file format version {header.get('version')!r}; this "
                             f"jacobprop reads version {VERSION}")
    for part in ("architecture", "params", "state"):
        if not isinstance(header.get(part), dict):
            raise ModelFileError(f"{where}: the header's {part!r} is missing or malformed")
    saved = header.get("optimizer")
    if saved is not None and not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
                                  and isinstance(saved.get("config"), dict)):
        raise ModelFileError(f"{where}: the header's 'optimizer' entry is malformed")
    return header


def _rebuild(header, arrays, optimizer, where) -> Layer:
    nodes: list[Layer] = []
    net = _decode_layer(header["architecture"], nodes, where, "architecture")
    expected = {f"param/{k}" for k in header["params"]} | {
        f"state/{k}" for k in header["state"]}
    if header.get("optimizer") is not None:
        expected |= {f"optim/{k}" for k in header["optimizer"]["state"]}
    missing, extra = sorted(expected - arrays.keys()), sorted(arrays.keys() - expected)
    if missing or extra:
        raise ModelFileError(f"{where}: the arrays do not match the header: missing {missing}, "
                             f"unexpected {extra}")
    params = net.params
    if list(params) != list(header["params"]):
        raise ModelFileError(f"{where}: the architecture has parameters {list(params)}, the "
                             f"file declares {list(header['params'])}")
    for key, live in params.items():
        value = _declared(arrays[f"param/{key}"], header["params"][key], f"parameter {key!r}",
                          where)
        if value.shape != live.shape or value.dtype != live.dtype:
            raise ModelFileError(f"{where}: parameter {key!r} is {value.dtype} {value.shape}, "
                                 f"but the architecture makes it {live.dtype} {live.shape}")
        np.copyto(live, value)
    per_node: dict[int, dict[str, np.ndarray]] = {}
    for entry, declared in header["state"].items():
        node, _, name = entry.partition("/")
        if not node.isdigit() or int(node) >= len(nodes):
            raise ModelFileError(f"{where}: state entry {entry!r} names no layer")
        per_node.setdefault(int(node), {})[name] = _declared(
            arrays[f"state/{entry}"], declared, f"state {entry!r}", where)
    for index, layer in enumerate(nodes):
        try:
            layer.load_state_arrays(per_node.get(index, {}))
        except (ValueError, KeyError) as error:
            raise ModelFileError(f"{where}: layer {index} ({type(layer).__name__}): "
                                 f"{error}") from None
    if optimizer is not None:
        _load_optimizer(optimizer, header.get("optimizer"), arrays, params, where)
    return net


def _declared(value, declared, what, where) -> np.ndarray:
    try:
        dtype, shape = np.dtype(declared[0]), tuple(declared[1])
    except (TypeError, ValueError, IndexError):
        raise ModelFileError(f"{where}: the header's entry for {what} is malformed: "
                             f"{declared!r}") from None
    if value.dtype != dtype or value.shape != shape:
        raise ModelFileError(f"{where}: {what} is stored as {value.dtype} {value.shape}, the "
                             f"header declares {dtype} {shape}")
    return value


def _decode_layer(node, nodes, where, at) -> Layer:
    if not isinstance(node, dict) or not isinstance(node.get("type"), str) or not isinstance(
            node.get("config"), dict):
        raise ModelFileError(f"{where}: {at} is not a layer node {{'type', 'config'}}")
    name = node["type"]
    cls = _layer_classes().get(name)
    if cls is None:
        raise ModelFileError(f"{where}: {at} is a {name!r}, which is not a registered layer "
                             "(jp.LAYERS); import the package that defines it before loading")
    index = len(nodes)
    nodes.append(None)  # reserve the pre-order slot; children come after it
    config = {key: _decode_value(value, nodes, where, f"{at}.{key}")
              for key, value in node["config"].items()}
    try:
        layer = cls.from_config(config)
    except (TypeError, ValueError, KeyError) as error:
        raise ModelFileError(f"{where}: {at} ({name}) cannot be rebuilt from its config "
                             f"{node['config']!r}: {error}") from None
    nodes[index] = layer
    return layer


def _decode_value(value, nodes, where, at):
    if isinstance(value, dict):
        if set(value) == {"__layer__"}:
            return _decode_layer(value["__layer__"], nodes, where, at)
        return {k: _decode_value(v, nodes, where, f"{at}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_value(v, nodes, where, f"{at}[{i}]") for i, v in enumerate(value)]
    return value


def _load_optimizer(optimizer, saved, arrays, params, where) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"load: `optimizer` must be a jacobprop Optimizer, got "
                        f"{type(optimizer).__name__}")
    if saved is None:
        raise ModelFileError(f"{where}: the file holds no optimizer state (save it with "
                             "jp.save(net, path, optimizer=opt))")
    if saved.get("type") != type(optimizer).__name__:
        raise ModelFileError(f"{where}: the file holds {saved.get('type')!r} state, not "
                             f"{type(optimizer).__name__}'s")
    try:
        fresh = type(optimizer)(**saved["config"])
    except (TypeError, ValueError, KeyError) as error:
        raise ModelFileError(f"{where}: the saved optimizer settings {saved.get('config')!r} "
                             f"are invalid: {error}") from None
    state: dict[str, dict[str, np.ndarray]] = {}
    for entry, declared in saved["state"].items():
        key, _, name = entry.rpartition("/")
        if key not in params:
            raise ModelFileError(f"{where}: optimizer state {entry!r} names no parameter")
        value = _declared(arrays[f"optim/{entry}"], declared, f"optimizer state {entry!r}",
                          where)
        if value.shape != params[key].shape:
            raise ModelFileError(f"{where}: optimizer state {entry!r} has shape {value.shape}, "
                                 f"the parameter {params[key].shape}")
        state.setdefault(key, {})[name] = value
    if state and list(state) != list(params):
        raise ModelFileError(f"{where}: the optimizer state covers {list(state)}, the "
                             f"parameters are {list(params)}")
    try:
        fresh.load_state_dict({"steps": saved.get("steps"), "state": state})
    except ValueError as error:
        raise ModelFileError(f"{where}: the saved optimizer state is invalid: {error}") from None
    optimizer.__dict__.update(fresh.__dict__)
