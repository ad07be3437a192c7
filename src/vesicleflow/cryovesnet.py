"""Import CryoVesNet's published Keras network into vesicleflow's model format.

CryoVesNet (Zuber-group/CryoVesNet) publishes its trained 3D U-Net as a Keras HDF5 file
(``weights.h5``). This module reads that file with h5py only: the architecture comes from the
``model_config`` JSON attribute (the layer graph), the weights from the ``model_weights`` groups.
Nothing is unpickled and TensorFlow is not needed.

The layer graph must be a U-Net that :class:`vesicleflow.model.UNet3d` reproduces exactly:

- per level, one or more ``Conv3D`` (linear, 'same' padding, stride 1) -> ``BatchNormalization``
  -> ReLU units (``Dropout`` layers are allowed anywhere; they do nothing at inference), then a
  2x2x2 ``MaxPooling3D``;
- the same units at the bottom;
- per level, coarse to fine, ``UpSampling3D`` x2 (nearest), ``Concatenate`` with the tensor that
  entered that level's pooling (in either order), then units;
- a 1x1x1 ``Conv3D`` with a sigmoid as the output (vesicleflow stores it without the sigmoid: the
  network returns logits, the caller applies the sigmoid).

Anything else is refused with a :class:`ModelError` that names the file and what differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vesicleflow.model import (
    Architecture,
    ModelError,
    ModelInfo,
    Preprocessing,
    UNet3d,
    save_model,
)

CRYOVESNET_VOXEL_SIZE_ANGSTROM = 22.0
CRYOVESNET_PREPROCESSING = Preprocessing(gaussian_sigma_voxels=1.0, zscore="mean_std")
DEFAULT_WINDOW = 64
# sha256 of cryovesnet/weights/weights.h5 as published by Zuber-group/CryoVesNet
PUBLISHED_SHA256 = "495748b7ad5daaa0f8895b49497798a9331a70ce84b3a227c7e387a930f15f37"

_DROPOUTS = {"Dropout", "SpatialDropout3D", "GaussianDropout", "GaussianNoise", "AlphaDropout"}
_CHANNEL_AXES = (-1, 4, [-1], [4])


@dataclass
class _Unit:
    """One Conv3D -> BatchNormalization -> ReLU unit, by Keras layer name."""

    conv: str
    bn: str


@dataclass
class _Graph:
    in_channels: int
    encoder: list[list[_Unit]] = field(default_factory=list)
    bottom: list[_Unit] = field(default_factory=list)
    decoder: list[list[_Unit]] = field(default_factory=list)
    skip_first: list[bool] = field(default_factory=list)  # per decoder level: Keras concat order
    head: str = ""


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Reader:
    """Parses one Keras HDF5 file; every error names the file."""

    def __init__(self, h5, path: Path):
        self.h5 = h5
        self.path = path

    def fail(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: not a CryoVesNet-style U-Net that vesicleflow can import: {what}")

    # -- layer graph ------------------------------------------------------------------------

    def layers(self) -> tuple[dict[str, tuple[str, dict, list[str]]], str, str]:
        if "model_config" not in self.h5.attrs:
            raise self.fail(
                "no 'model_config' attribute (a weights-only file: the layer graph, and with it the "
                "architecture and the concatenation order, is not recorded)"
            )
        try:
            config = json.loads(_text(self.h5.attrs["model_config"]))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self.fail(f"'model_config' is not valid JSON ({err})") from err
        if not isinstance(config, dict) or config.get("class_name") not in ("Functional", "Model"):
            kind = config.get("class_name") if isinstance(config, dict) else type(config).__name__
            raise self.fail(f"model class {kind!r} is not a Keras functional model")
        body = config.get("config") or {}
        inputs, outputs = body.get("input_layers") or [], body.get("output_layers") or []
        if len(inputs) != 1 or len(outputs) != 1:
            raise self.fail(f"{len(inputs)} inputs and {len(outputs)} outputs (expected one each)")
        layers: dict[str, tuple[str, dict, list[str]]] = {}
        for layer in body.get("layers") or []:
            name, cls, cfg = layer.get("name"), layer.get("class_name"), layer.get("config") or {}
            nodes = layer.get("inbound_nodes") or []
            if cls == "InputLayer":
                sources = []
            elif len(nodes) != 1:
                raise self.fail(f"layer {name!r} ({cls}) is called {len(nodes)} times (expected once)")
            else:
                sources = []
                for ref in nodes[0]:
                    if not isinstance(ref, list) or len(ref) < 3 or ref[1:3] != [0, 0]:
                        raise self.fail(f"layer {name!r} has an inbound reference {ref!r} not understood")
                    sources.append(ref[0])
            if cls != "InputLayer" and not sources:
                raise self.fail(f"layer {name!r} ({cls}) has no input")
            if name in layers:
                raise self.fail(f"layer name {name!r} occurs twice")
            layers[name] = (cls, cfg, sources)
        if not layers:
            raise self.fail("'model_config' lists no layers")
        for name, (_, _, sources) in layers.items():
            missing = [s for s in sources if s not in layers]
            if missing:
                raise self.fail(f"layer {name!r} takes input from unknown layer(s) {missing}")
        return layers, inputs[0][0], outputs[0][0]

    def graph(self) -> tuple[_Graph, dict]:
        layers, input_name, output_name = self.layers()
        if input_name not in layers or layers[input_name][0] != "InputLayer":
            raise self.fail(f"input {input_name!r} is not an InputLayer")
        in_shape = layers[input_name][1].get("batch_input_shape") or [None]
        if len(in_shape) != 5:
            raise self.fail(f"input shape {in_shape} is not 3D with channels (batch, z, y, x, c)")

        def canonical(name: str) -> str:
            for _ in range(len(layers)):
                if layers[name][0] not in _DROPOUTS:
                    return name
                name = layers[name][2][0]
            raise self.fail("the layer graph has a cycle")

        # Walk back from the output along the main path; at a concatenation follow the
        # upsampled branch and remember the skip. Dropout-like layers are identities here.
        tokens: list[tuple[str, str, dict]] = []  # (kind, layer name, extra), output first
        visited: set[str] = set()
        name = output_name
        for _ in range(len(layers) + 1):
            visited.add(name)
            cls, cfg, sources = layers[name]
            if cls == "InputLayer":
                break
            if cls == "Concatenate":
                if len(sources) != 2:
                    raise self.fail(f"{name!r} concatenates {len(sources)} tensors (expected 2)")
                if cfg.get("axis", -1) not in _CHANNEL_AXES:
                    raise self.fail(f"{name!r} concatenates along axis {cfg.get('axis')} (expected channels)")
                ups = [i for i, s in enumerate(sources) if layers[canonical(s)][0] == "UpSampling3D"]
                if len(ups) != 1:
                    raise self.fail(f"{name!r} does not join one UpSampling3D output with one skip tensor")
                up = ups[0]
                skip = sources[1 - up]
                self._mark_dropouts(layers, skip, visited)
                tokens.append(("concat", name, {"skip": canonical(skip), "skip_first": up == 1}))
                name = sources[up]
                continue
            if len(sources) != 1:
                raise self.fail(f"layer {name!r} ({cls}) has {len(sources)} inputs (expected 1)")
            if cls not in _DROPOUTS:
                tokens.append((cls, name, cfg))
            name = sources[0]
        else:
            raise self.fail("the layer graph has a cycle")
        if name != input_name:
            raise self.fail(f"the output does not lead back to the input {input_name!r}")
        unused = [n for n in layers if n not in visited]
        if unused:
            raise self.fail(f"layers outside the U-Net path: {unused[:5]}")
        tokens.reverse()
        return self._parse(tokens, int(in_shape[-1] or 1)), layers

    @staticmethod
    def _mark_dropouts(layers, name: str, visited: set[str]) -> None:
        while layers[name][0] in _DROPOUTS and name not in visited:
            visited.add(name)
            name = layers[name][2][0]

    def _parse(self, tokens: list[tuple[str, str, dict]], in_channels: int) -> _Graph:
        graph = _Graph(in_channels=in_channels)
        pos = 0

        def peek(offset: int = 0) -> tuple[str, str, dict]:
            return tokens[pos + offset] if pos + offset < len(tokens) else ("end", "", {})

        def units() -> list[_Unit]:
            nonlocal pos
            found = []
            while peek()[0] == "Conv3D" and peek(1)[0] != "end":
                (_, conv, _), (bn_cls, bn, _), (act_cls, act, act_cfg) = peek(), peek(1), peek(2)
                if bn_cls != "BatchNormalization":
                    raise self.fail(f"{conv!r} is followed by {bn_cls} {bn!r}, not BatchNormalization")
                if not _is_relu(act_cls, act_cfg):
                    raise self.fail(f"{bn!r} is followed by {act_cls} {act!r}, not a ReLU")
                found.append(_Unit(conv, bn))
                pos += 3
            if not found:
                kind, name, _ = peek()
                raise self.fail(f"expected Conv3D-BatchNormalization-ReLU units, found {kind} {name!r}")
            return found

        pooled: list[str] = []  # canonical tensor entering each pooling = the skip of that level
        while True:
            block = units()
            kind, name, cfg = peek()
            if kind != "MaxPooling3D":
                break
            _check_pool(self, name, cfg)
            graph.encoder.append(block)
            skip = tokens[pos - 1][1]  # the ReLU (or Activation) before the pool
            pooled.append(skip)
            pos += 1
        graph.bottom = block
        while peek()[0] == "UpSampling3D":
            _, name, cfg = peek()
            _check_upsampling(self, name, cfg)
            kind, concat, extra = peek(1)
            if kind != "concat":
                raise self.fail(f"{name!r} is followed by {kind} {concat!r}, not a Concatenate")
            level = len(graph.encoder) - 1 - len(graph.decoder)
            if level < 0 or extra["skip"] != pooled[level]:
                raise self.fail(
                    f"{concat!r} joins {extra['skip']!r}, not the skip of its level "
                    f"({pooled[level] if level >= 0 else 'more up- than down-sampling steps'!r})"
                )
            graph.skip_first.append(extra["skip_first"])
            pos += 2
            graph.decoder.append(units())
        if len(graph.decoder) != len(graph.encoder):
            raise self.fail(f"{len(graph.encoder)} pooling steps but {len(graph.decoder)} upsampling steps")
        kind, name, cfg = peek()
        if kind != "Conv3D" or pos != len(tokens) - 1:
            raise self.fail(f"expected the output 1x1x1 Conv3D after the last level, found {kind} {name!r}")
        graph.head = name
        return graph

    # -- weights ----------------------------------------------------------------------------

    def weights(self, layer: str) -> dict[str, np.ndarray]:
        root = self.h5.get("model_weights", self.h5)
        if layer not in root:
            raise self.fail(f"no weights stored for layer {layer!r}")
        group = root[layer]
        names = [_text(n) for n in group.attrs.get("weight_names", [])]
        out = {}
        for full in names:
            key = full.rsplit("/", 1)[-1].split(":", 1)[0]
            if full not in group:
                raise self.fail(f"weight {full!r} of layer {layer!r} is listed but missing")
            out[key] = np.asarray(group[full][()], dtype=np.float32)
        return out


def _is_relu(cls: str, cfg: dict) -> bool:
    if cls == "Activation":
        return cfg.get("activation") == "relu"
    if cls == "ReLU":
        return (cfg.get("max_value") is None and not cfg.get("negative_slope")
                and not cfg.get("threshold"))
    return False


def _check_pool(reader: _Reader, name: str, cfg: dict) -> None:
    size = list(cfg.get("pool_size") or [])
    strides = list(cfg.get("strides") or size)
    if size != [2, 2, 2] or strides != [2, 2, 2]:
        raise reader.fail(f"{name!r} pools {size} with strides {strides} (expected 2x2x2, stride 2)")
    # 'valid' and 'same' agree on even sizes, which the window's divisor guarantees
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise reader.fail(f"{name!r} is {cfg.get('data_format')} (expected channels_last)")


def _check_upsampling(reader: _Reader, name: str, cfg: dict) -> None:
    if list(cfg.get("size") or []) != [2, 2, 2]:
        raise reader.fail(f"{name!r} upsamples by {cfg.get('size')} (expected 2x2x2)")
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise reader.fail(f"{name!r} is {cfg.get('data_format')} (expected channels_last)")


def _check_conv(reader: _Reader, name: str, cfg: dict, kernel: int, activation: str) -> None:
    problems = []
    if list(cfg.get("kernel_size") or []) != [kernel] * 3:
        problems.append(f"kernel_size {cfg.get('kernel_size')} (expected {[kernel] * 3})")
    if list(cfg.get("strides") or [1, 1, 1]) != [1, 1, 1]:
        problems.append(f"strides {cfg.get('strides')}")
    if list(cfg.get("dilation_rate") or [1, 1, 1]) != [1, 1, 1]:
        problems.append(f"dilation_rate {cfg.get('dilation_rate')}")
    if int(cfg.get("groups", 1)) != 1:
        problems.append(f"groups {cfg.get('groups')}")
    if kernel > 1 and cfg.get("padding") != "same":
        problems.append(f"padding {cfg.get('padding')!r} (expected 'same')")
    if cfg.get("data_format", "channels_last") != "channels_last":
        problems.append(f"data_format {cfg.get('data_format')!r}")
    if cfg.get("activation", "linear") != activation:
        problems.append(f"activation {cfg.get('activation')!r} (expected {activation!r})")
    if problems:
        raise reader.fail(f"Conv3D {name!r}: " + ", ".join(problems))


def _copy_conv(reader: _Reader, name: str, cfg: dict, conv: nn.Conv3d, perm=None) -> None:
    stored = reader.weights(name)
    extra = set(stored) - {"kernel", "bias"}
    if extra or "kernel" not in stored:
        raise reader.fail(f"Conv3D {name!r} stores weights {sorted(stored)} (expected kernel, bias)")
    kernel = stored["kernel"]
    out_c, in_c, *size = conv.weight.shape
    expected = (*size, in_c, out_c)  # Keras: (kz, ky, kx, in, out)
    if kernel.shape != expected:
        raise reader.fail(f"Conv3D {name!r} kernel has shape {kernel.shape}, expected {expected}")
    weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
    if perm is not None:
        weight = weight[:, perm]
    if cfg.get("use_bias", True):
        bias = stored.get("bias")
        if bias is None or bias.shape != (out_c,):
            shape = None if bias is None else bias.shape
            raise reader.fail(f"Conv3D {name!r} bias has shape {shape}, expected {(out_c,)}")
    else:
        bias = np.zeros(out_c, dtype=np.float32)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(torch.from_numpy(bias))


def _copy_bn(reader: _Reader, name: str, cfg: dict, bn: nn.BatchNorm3d) -> None:
    stored = reader.weights(name)
    n = bn.num_features
    values = {
        "gamma": stored.get("gamma") if cfg.get("scale", True) else np.ones(n, np.float32),
        "beta": stored.get("beta") if cfg.get("center", True) else np.zeros(n, np.float32),
        "moving_mean": stored.get("moving_mean"),
        "moving_variance": stored.get("moving_variance"),
    }
    for key, value in values.items():
        if value is None or value.shape != (n,):
            shape = None if value is None else value.shape
            raise reader.fail(f"BatchNormalization {name!r} {key} has shape {shape}, expected {(n,)}")
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(values["gamma"]))
        bn.bias.copy_(torch.from_numpy(values["beta"]))
        bn.running_mean.copy_(torch.from_numpy(values["moving_mean"]))
        bn.running_var.copy_(torch.from_numpy(values["moving_variance"]))


def _convert(reader: _Reader) -> tuple[UNet3d, _Graph]:
    """Derive the architecture from the layer graph, check every layer, and copy the weights."""
    graph, layers = reader.graph()
    convs = [u.conv for u in _all_units(graph)]
    bns = [u.bn for u in _all_units(graph)]
    kernel = layers[convs[0]][1].get("kernel_size", [0])[0]
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise reader.fail(f"Conv3D {convs[0]!r} has kernel size {kernel} (expected odd)")
    for conv in convs:
        _check_conv(reader, conv, layers[conv][1], kernel, "linear")
    _check_conv(reader, graph.head, layers[graph.head][1], 1, "sigmoid")
    eps = {float(layers[bn][1].get("epsilon", 1e-3)) for bn in bns}
    if len(eps) != 1:
        raise reader.fail(f"batch normalisations use different epsilons {sorted(eps)}")
    for bn in bns:
        if layers[bn][1].get("axis", -1) not in _CHANNEL_AXES:
            raise reader.fail(f"BatchNormalization {bn!r} normalises axis {layers[bn][1].get('axis')}")

    def filters(block: list[_Unit]) -> list[int]:
        return [int(layers[u.conv][1].get("filters", 0)) for u in block]

    arch = Architecture(
        encoder=[filters(b) for b in graph.encoder],
        bottom=filters(graph.bottom),
        decoder=[filters(b) for b in graph.decoder],
        in_channels=graph.in_channels,
        out_channels=int(layers[graph.head][1].get("filters", 0)),
        kernel_size=kernel,
        batchnorm_eps=eps.pop(),
        upsample="nearest",  # Keras UpSampling3D repeats voxels
    )
    try:
        net = UNet3d(arch)
    except (ModelError, ValueError, RuntimeError) as err:
        raise reader.fail(f"derived architecture {arch} is not valid ({err})") from err

    def copy_block(module: nn.Sequential, units: list[_Unit], first_perm=None) -> None:
        convs = [m for m in module if isinstance(m, nn.Conv3d)]
        bns = [m for m in module if isinstance(m, nn.BatchNorm3d)]
        for i, (conv, bn, unit) in enumerate(zip(convs, bns, units, strict=True)):
            _copy_conv(reader, unit.conv, layers[unit.conv][1], conv, first_perm if i == 0 else None)
            _copy_bn(reader, unit.bn, layers[unit.bn][1], bn)

    for module, units in zip(net.encoder, graph.encoder, strict=True):
        copy_block(module, units)
    copy_block(net.bottom, graph.bottom)
    for level, (module, units) in enumerate(zip(net.decoder, graph.decoder, strict=True)):
        perm = None
        if graph.skip_first[level]:
            # Keras concatenated [skip, upsampled]; UNet3d concatenates [upsampled, skip]:
            # reorder the first convolution's input channels to match.
            skip, total = arch.encoder[-1 - level][-1], module[0].in_channels
            perm = torch.cat([torch.arange(skip, total), torch.arange(skip)])
        copy_block(module, units, perm)
    _copy_conv(reader, graph.head, layers[graph.head][1], net.head)
    return net.eval(), graph


def import_cryovesnet(h5_path: Path, out_dir: Path) -> Path:
    """Convert CryoVesNet's Keras ``weights.h5`` into a vesicleflow model folder at ``out_dir``.

    The file is read with h5py only. Returns ``out_dir``. Raises :class:`ModelError` when the
    file cannot be read or its layers are not a U-Net that :class:`UNet3d` reproduces.
    """
    import h5py

    h5_path, out_dir = Path(h5_path), Path(out_dir)
    if not h5_path.is_file():
        raise ModelError(f"{h5_path}: no such file")
    try:
        h5 = h5py.File(h5_path, "r")
    except OSError as err:
        raise ModelError(f"{h5_path}: not a readable HDF5 (Keras) file ({err})") from err
    with h5:
        reader = _Reader(h5, h5_path)
        try:
            net, graph = _convert(reader)
        except ModelError:
            raise
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, OSError) as err:
            raise reader.fail(f"malformed layer configuration or weights ({type(err).__name__}: {err})") from err
        keras_version = _text(h5.attrs.get("keras_version", "unknown"))
    arch = net.arch

    digest = _sha256(h5_path)
    window = DEFAULT_WINDOW
    if window % arch.divisor:
        window = -(-window // arch.divisor) * arch.divisor
    if digest == PUBLISHED_SHA256:
        origin = (
            "CryoVesNet published weights (Zuber-group/CryoVesNet, cryovesnet/weights/weights.h5, "
            "GPL-3.0, (c) its authors)"
        )
    else:
        origin = "a CryoVesNet-style Keras U-Net (not the published CryoVesNet weights file)"
    info = ModelInfo(
        architecture=arch,
        voxel_size_angstrom=CRYOVESNET_VOXEL_SIZE_ANGSTROM,
        preprocessing=Preprocessing(**vars(CRYOVESNET_PREPROCESSING)),
        window=window,
        name="cryovesnet",
        version=f"keras-{keras_version}+sha256.{digest[:12]}",
        trained_on=f"{origin}; imported from {h5_path.name}, sha256 {digest}",
        training={
            "source": "cryovesnet",
            "published_weights": digest == PUBLISHED_SHA256,
            "imported_from": h5_path.name,
            "sha256": digest,
            "keras_version": keras_version,
            "keras_layers": [u.conv for u in _all_units(graph)] + [graph.head],
            "output_activation": "sigmoid (applied by vesicleflow; the stored network returns logits)",
        },
    )
    return save_model(net, info, out_dir)


def _all_units(graph: _Graph) -> list[_Unit]:
    return [*(u for b in graph.encoder for u in b), *graph.bottom, *(u for b in graph.decoder for u in b)]
