"""The "Other layers" section: conv, LSTM, GRU and embedding, each against its nn counterpart.

A spec of kind "other" has `shape` = {"layer": "conv2d" | "lstm" | "gru" | "embedding", ...sizes}
and `case` = one of VARIANTS' keys. Each layer's training step is the same as the linear rows'
(workload.Workload.train_step): zero_grad, forward, sum(out) + KL, backward. The floor row of every
group is the torch.nn layer (case "nn"); report.add_ratios divides by it.
"""
import importlib
from dataclasses import dataclass

import torch
from torch import nn

import cases  # noqa: F401  (puts the repo root on sys.path for an in-place bayes_ext build)


@dataclass(frozen=True)
class Variant:
    name: str     # key in the JSON rows (`case`)
    label: str    # row label
    kl: str       # how the KL is obtained
    module: str   # import that must succeed for the row to run


VARIANTS = {v.name: v for v in [
    Variant("nn", "torch.nn", "none", "torch.nn"),
    Variant("bayes_ext", "bayes_ext", "MC log q - log p", "bayes_ext.modules"),
    Variant("bayes_ext_cf", "bayes_ext kl=closed_form", "closed form", "bayes_ext.modules"),
    Variant("blitz", "BLiTZ 0.2.8", "MC log q - log p", "blitz.modules"),
]}

# Issue 4's targets for the bayes_ext row of each layer (reported, not asserted).
TARGETS = {"conv2d": ("bayes_ext", 1.5), "lstm": ("bayes_ext", 1.3), "gru": ("bayes_ext", 1.3),
           "embedding": ("bayes_ext_cf", 3.0)}

NN_NAMES = {"conv2d": "nn.Conv2d", "lstm": "nn.LSTM", "gru": "nn.GRU", "embedding": "nn.Embedding"}


def layer_plan(mode):
    """[(title, layer config, variant names)] for a mode. Sizes from issue 4; --quick shrinks them."""
    if mode == "quick":
        conv_a = dict(layer="conv2d", batch=4, cin=1, cout=6, k=5, pad=0, hw=12)
        conv_b = dict(layer="conv2d", batch=2, cin=16, cout=16, k=3, pad=1, hw=8)
        rnn = dict(batch=4, seq=8, inp=16, hidden=32)
        emb = dict(layer="embedding", num=1000, dim=16, batch=4, tokens=8)
    else:
        conv_a = dict(layer="conv2d", batch=64, cin=1, cout=6, k=5, pad=0, hw=28)
        conv_b = dict(layer="conv2d", batch=16, cin=256, cout=256, k=3, pad=1, hw=28)
        rnn = dict(batch=32, seq=64, inp=64, hidden=256)
        emb = dict(layer="embedding", num=100_000, dim=128, batch=32, tokens=64)
    three = ["nn", "bayes_ext", "blitz"]
    return [("Conv2d LeNet", conv_a, three),
            ("Conv2d VGG block", conv_b, three),
            ("LSTM", dict(rnn, layer="lstm"), three),
            ("GRU", dict(rnn, layer="gru"), three),
            ("Embedding", emb, ["nn", "bayes_ext_cf", "bayes_ext", "blitz"])]


def shape_str(cfg):
    if cfg["layer"] == "conv2d":
        return (f"{cfg['batch']}x{cfg['cin']}x{cfg['hw']}x{cfg['hw']} {cfg['cin']}->{cfg['cout']} "
                f"{cfg['k']}x{cfg['k']} pad {cfg['pad']}")
    if cfg["layer"] in ("lstm", "gru"):
        return f"B{cfg['batch']} T{cfg['seq']} in {cfg['inp']} hidden {cfg['hidden']}"
    return f"{cfg['num']}x{cfg['dim']} table, {cfg['batch']}x{cfg['tokens']} ids"


def availability(name):
    try:
        importlib.import_module(VARIANTS[name].module)
        return True, ""
    except Exception as e:  # a missing reference package only skips its rows
        return False, f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def make_layer(name, cfg):
    """(module, input) for variant `name` of layer config `cfg`; every library's default hyper-parameters."""
    kind = cfg["layer"]
    if kind == "conv2d":
        x = torch.randn(cfg["batch"], cfg["cin"], cfg["hw"], cfg["hw"])  # workload makes float inputs require grad
        args = (cfg["cin"], cfg["cout"])
        if name == "nn":
            return nn.Conv2d(*args, cfg["k"], padding=cfg["pad"]), x
        if name == "bayes_ext":
            from bayes_ext.modules import BayesianConv2d
            return BayesianConv2d(*args, cfg["k"], padding=cfg["pad"]), x
        if name == "blitz":
            from blitz.modules import BayesianConv2d
            return BayesianConv2d(*args, (cfg["k"], cfg["k"]), padding=cfg["pad"]), x  # tuple kernel only
    elif kind in ("lstm", "gru"):
        x = torch.randn(cfg["batch"], cfg["seq"], cfg["inp"])  # batch first
        args = (cfg["inp"], cfg["hidden"])
        if name == "nn":
            return (nn.LSTM if kind == "lstm" else nn.GRU)(*args, batch_first=True), x
        if name == "bayes_ext":
            from bayes_ext.modules import BayesianGRU, BayesianLSTM
            return (BayesianLSTM if kind == "lstm" else BayesianGRU)(*args), x
        if name == "blitz":
            from blitz.modules import BayesianGRU, BayesianLSTM
            return (BayesianLSTM if kind == "lstm" else BayesianGRU)(*args), x
    elif kind == "embedding":
        x = torch.randint(0, cfg["num"], (cfg["batch"], cfg["tokens"]))  # ids: no grad
        args = (cfg["num"], cfg["dim"])
        if name == "nn":
            return nn.Embedding(*args), x
        if name in ("bayes_ext", "bayes_ext_cf"):
            from bayes_ext.modules import BayesianEmbedding
            return BayesianEmbedding(*args, kl="closed_form" if name == "bayes_ext_cf" else "mc"), x
        if name == "blitz":
            from blitz.modules import BayesianEmbedding
            return BayesianEmbedding(*args), x
    raise KeyError((name, kind))


def forward(m, x, need_kl):
    """-> (out, kl or None). RNNs return (seq, state) in every library here: the loss uses seq."""
    out = m(x)
    if isinstance(out, tuple):
        out = out[0]
    return out, (cases.model_kl(m) if need_kl else None)


def label(name, cfg):
    return NN_NAMES[cfg["layer"]] if name == "nn" else VARIANTS[name].label
