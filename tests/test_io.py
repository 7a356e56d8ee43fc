"""save/load: bit-exact round trips, optimizer state, extra layer state, atomic writes,
and a clear refusal of every corrupted, truncated, foreign, mismatched or pickled file."""

import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jacobprop as jp
from jacobprop.io import HEADER, _encode_layer
from jacobprop.testing import dtypes, inputs, sequentials


def network(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    inner = jp.Sequential(jp.Dense(5, 4, bias=False, rng=rng, dtype=dtype), jp.Softplus())
    return jp.Sequential(jp.Dense(3, 5, rng=rng, dtype=dtype), jp.LeakyReLU(0.3), inner,
                         jp.Dense(4, 2, rng=rng, dtype=dtype), jp.Softmax())


def same_params(a, b):
    return list(a.params) == list(b.params) and all(
        a.params[k].dtype == b.params[k].dtype and np.array_equal(a.params[k], b.params[k])
        for k in a.params)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_round_trip_is_bit_exact_with_layer_options(tmp_path, dtype):
    net = network(1, dtype)
    path = jp.save(net, tmp_path / "model.npz")
    loaded = jp.load(path)
    assert isinstance(loaded, jp.Sequential) and repr(loaded) == repr(net)
    assert same_params(net, loaded)
    assert loaded[1].alpha == 0.3 and loaded[2][0].bias is False
    x = np.random.default_rng(2).standard_normal((7, 3)).astype(dtype)
    assert np.array_equal(net(x), loaded(x))


@given(data=st.data())
def test_every_registered_layer_round_trips(data):
    """Drawn from jp.LAYERS, so a new layer's config() and state hooks are checked at once."""
    dtype = data.draw(dtypes())
    net = data.draw(sequentials(dtype=dtype)).eval()
    with tempfile.TemporaryDirectory() as folder:
        loaded = jp.load(jp.save(net, Path(folder) / "m.npz")).eval()
    assert _encode_layer(loaded, []) == _encode_layer(net, [])
    assert same_params(net, loaded)
    x = data.draw(inputs(net, dtype=dtype))
    assert np.array_equal(net(x), loaded(x))


def test_the_path_is_used_as_given_and_no_temporary_file_is_left(tmp_path):
    jp.save(network(3), tmp_path / "model")
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert isinstance(jp.load(tmp_path / "model"), jp.Sequential)


def test_optimizer_state_round_trip_resumes_training_identically(tmp_path):
    rng = np.random.default_rng(4)
    x, t = rng.standard_normal((20, 3)), rng.integers(0, 2, size=20)
    net, optimizer = network(5), jp.Adam(0.01, weight_decay=0.1, decoupled=True)
    fit = dict(epochs=2, batch_size=8, progress=False)
    jp.fit(net, x, t, jp.SoftmaxCrossEntropy(), optimizer=optimizer,
           rng=np.random.default_rng(6), **fit)
    jp.save(net, tmp_path / "m.npz", optimizer=optimizer)
    resumed_optimizer = jp.Adam()
    resumed = jp.load(tmp_path / "m.npz", optimizer=resumed_optimizer)
    assert resumed_optimizer.config() == optimizer.config()
    assert resumed_optimizer.steps == optimizer.steps == 6
    for net_, optimizer_ in ((net, optimizer), (resumed, resumed_optimizer)):
        jp.fit(net_, x, t, jp.SoftmaxCrossEntropy(), optimizer=optimizer_,
               rng=np.random.default_rng(7), **fit)
    assert same_params(net, resumed)


def test_optimizer_requests_that_the_file_cannot_satisfy(tmp_path):
    jp.save(network(8), tmp_path / "m.npz")
    with pytest.raises(jp.ModelFileError, match="no optimizer state"):
        jp.load(tmp_path / "m.npz", optimizer=jp.Adam())
    jp.save(network(8), tmp_path / "m.npz", optimizer=jp.SGD(0.1))
    with pytest.raises(jp.ModelFileError, match="'SGD' state, not Adam's"):
        jp.load(tmp_path / "m.npz", optimizer=jp.Adam())
    with pytest.raises(ValueError, match="schedule"):
        jp.save(network(8), tmp_path / "m.npz", optimizer=jp.SGD(lambda step: 0.1))


class CounterCache(NamedTuple):
    x: np.ndarray


class Counter(jp.Layer):
    """Identity that keeps a running count outside `params` (like BatchNorm's statistics)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.seen = np.zeros(width)

    def config(self):
        return {"width": self.width}

    def state_arrays(self):
        return {"seen": self.seen}

    def load_state_arrays(self, arrays):
        self.seen = arrays["seen"].copy()

    def _forward(self, x):
        return x, CounterCache(x)

    def _jacobian(self, cache):
        return jp.IdentityJacobian(*cache.x.shape, cache.x.dtype)


def test_layers_contribute_extra_state_arrays(tmp_path, monkeypatch):
    monkeypatch.setitem(jp.LAYERS, "Counter", Counter)
    rng = np.random.default_rng(9)
    net = jp.Sequential(jp.Dense(2, 3, rng=rng), jp.Sequential(Counter(3)))
    net[1][0].seen[...] = [1.5, -2.0, 7.0]
    loaded = jp.load(jp.save(net, tmp_path / "m.npz"))
    assert np.array_equal(loaded[1][0].seen, [1.5, -2.0, 7.0])


def test_unregistered_layers_cannot_be_saved(tmp_path):
    with pytest.raises(TypeError, match="register_layer"):
        jp.save(jp.Sequential(Counter(2)), tmp_path / "m.npz")
    assert not os.listdir(tmp_path)


def test_a_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    jp.save(network(10), path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        jp.save(network(11), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.npz"]


# ---- files that must be refused ----------------------------------------------------------
def entries(path):
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def header_of(arrays):
    return json.loads(arrays[HEADER].tobytes().decode())


def with_header(arrays, header):
    return {**arrays, HEADER: np.frombuffer(json.dumps(header).encode(), np.uint8)}


def edit_header(change):
    def edit(arrays):
        header = header_of(arrays)
        change(header)
        return with_header(arrays, header)
    return edit


def drop(name):
    return lambda arrays: {k: v for k, v in arrays.items() if k != name}


def replace(name, value):
    return lambda arrays: {**arrays, name: value}


def set_config(header, **config):
    header["architecture"]["config"]["layers"][0]["__layer__"]["config"].update(config)


def set_type(header, name):
    header["architecture"]["config"]["layers"][0]["__layer__"]["type"] = name


def deeply_nested(arrays, levels=5000):
    """A header whose architecture nests `levels` Sequentials (built as text: json.dumps
    itself refuses such depth)."""
    header = json.dumps({**header_of(arrays), "architecture": None})
    node = '{"type": "Sequential", "config": {"layers": [{"__layer__": '
    tree = node * levels + '{"type": "Identity", "config": {}}' + "}]}}" * levels
    text = header.replace('"architecture": null', f'"architecture": {tree}')
    return {**arrays, HEADER: np.frombuffer(text.encode(), np.uint8)}


EDITS = {
    "no header (a foreign npz)": (drop(HEADER), "without the '__jacobprop__' header"),
    "header not JSON": (replace(HEADER, np.frombuffer(b"{nope", np.uint8)), "not valid JSON"),
    "header not bytes": (replace(HEADER, np.zeros(3)), "must be UTF-8 bytes"),
    "another format": (edit_header(lambda h: h.update(format="other")), "format"),
    "a newer version": (edit_header(lambda h: h.update(version=99)), "version 99"),
    "a missing parameter": (drop("param/0.W"), r"missing \['param/0.W'\]"),
    "an extra array": (replace("param/9.W", np.zeros(2)), r"unexpected \['param/9.W'\]"),
    "a parameter of another shape": (replace("param/0.W", np.zeros((5, 4))),
                                     "stored as float64 \\(5, 4\\)"),
    "a parameter of another dtype": (replace("param/0.W", np.zeros((5, 3), np.float32)),
                                     "stored as float32"),
    "an architecture that disagrees": (edit_header(lambda h: set_config(h, in_features=4)),
                                       "the architecture makes it float64 \\(5, 4\\)"),
    "an unknown layer": (edit_header(lambda h: set_type(h, "os.system")),
                         "'os.system', which is not a registered layer"),
    "an invalid layer config": (edit_header(lambda h: set_config(h, in_features=-1)),
                                "Dense\\) cannot be rebuilt"),
    "an unexpected config key": (edit_header(lambda h: set_config(h, command="rm")),
                                 "cannot be rebuilt"),
    "a malformed optimizer entry": (edit_header(lambda h: h.update(optimizer=[1])),
                                    "'optimizer' entry is malformed"),
    "a deeply nested architecture": (deeply_nested, "nested too deeply|not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_edited_files_are_refused_with_what_is_wrong(tmp_path, case):
    edit, match = EDITS[case]
    path = tmp_path / "m.npz"
    jp.save(network(12), path)
    np.savez(tmp_path / "bad.npz", **edit(entries(path)))
    with pytest.raises(jp.ModelFileError, match=match):
        jp.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9, 0.999])
def test_truncated_files_are_refused(tmp_path, keep):
    path = tmp_path / "m.npz"
    data = jp.save(network(13), path).read_bytes()
    path.write_bytes(data[:int(keep * len(data))])
    with pytest.raises(jp.ModelFileError, match="not a jacobprop model file|truncated"):
        jp.load(path)


def test_a_flipped_byte_inside_an_array_is_caught_by_the_checksum(tmp_path):
    path = tmp_path / "m.npz"
    data = bytearray(jp.save(network(14), path).read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("param/0.W.npy")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 140] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(jp.ModelFileError, match="param/0.W.*corrupted"):
        jp.load(path)


def test_text_and_npy_files_are_refused(tmp_path):
    (tmp_path / "text.npz").write_text("weights: 1 2 3\n")
    with pytest.raises(jp.ModelFileError, match="not a jacobprop model file"):
        jp.load(tmp_path / "text.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(jp.ModelFileError, match="single .npy array"):
        jp.load(tmp_path / "array.npy")


class Exploit:
    """Unpickling this would create a file: a stand-in for arbitrary code."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_file_carrying_a_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "m.npz"
    jp.save(network(15), path)
    payload = np.empty(1, dtype=object)
    payload[0] = Exploit(marker)
    np.savez(tmp_path / "evil.npz", **{**entries(path), "param/0.W": payload})
    with pytest.raises(jp.ModelFileError, match="object array.*pickle"):
        jp.load(tmp_path / "evil.npz")
    (tmp_path / "raw.npz").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(jp.ModelFileError):
        jp.load(tmp_path / "raw.npz")
    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "member.npz", "w") as archive:
        archive.writestr(f"{HEADER}.npy", buffer.getvalue())
    with pytest.raises(jp.ModelFileError, match="pickle"):
        jp.load(tmp_path / "member.npz")
    assert not marker.exists()


def test_every_layer_rebuilds_from_its_own_config():
    """`type(layer).from_config(layer.config())` is the rebuild rule jp.load relies on;
    Sequential passes its layers positionally through its own from_config."""
    rng = np.random.default_rng(3)
    net = jp.Sequential(jp.Dense(2, 3, rng=rng), jp.Residual(jp.Sequential(jp.Dense(3, 3, rng=rng),
                                                                        jp.Tanh())))
    rebuilt = type(net).from_config(net.config())
    assert isinstance(rebuilt, jp.Sequential) and len(rebuilt) == 2
    assert rebuilt[0] is net[0] and rebuilt[1] is net[1]  # the same layer objects, re-stacked
    dense = jp.Dense.from_config(net[0].config())
    assert dense.config() == net[0].config() and dense is not net[0]
