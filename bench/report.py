"""Results out: machine description, ratios to nn.Linear, Markdown/terminal tables, JSON, PNG chart."""
import datetime
import json
import os
import platform
import re
import socket

import torch

import cases

MB = 2 ** 20


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in fl]
    except OSError:
        pass
    return []


def machine_info(device):
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "packages": {d: cases.dist_version(d) for d in
                     ("bayes_ext", "blitz-bayesian-pytorch", "bayesian-torch", "torchbnn")},
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import bayes_ext
        info["bayes_ext_extension"] = bool(bayes_ext.extension_available())
        info["bayes_ext_backend"] = str(getattr(bayes_ext, "get_backend", lambda: None)())
        info["bayes_ext_cpu_isa"] = None
        if info["bayes_ext_extension"]:
            try:
                info["bayes_ext_cpu_isa"] = str(torch.ops.bayes_ext.cpu_kernel_isa())
            except Exception:  # older builds without the op
                pass
    except Exception as e:
        info["bayes_ext_extension"] = False
        info["bayes_ext_error"] = f"{type(e).__name__}: {e}"[:200]
    return info


def machine_tag(info):
    """File-name tag: the hardware, not the (often random) container hostname."""
    hw = info.get("gpu") if info["device"] == "cuda" else info["cpu_model"]
    hw = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", hw.lower())
    hw = re.sub(r"[^a-z0-9]+", "-", hw).strip("-")[:40]
    return f"{info['usable_cores']}c-{hw}" if info["device"] == "cpu" else hw


FLOORS = ("linear", "nn")  # nn.Linear (layer / transformer rows), the torch.nn layer ("other" rows)


def add_ratios(rows):
    """Ratios to the nn.Linear (or, in "Other layers", torch.nn layer) row of the same section / shape /
    sample_nbr / precision."""
    floor = {(r["section"], r["shape"], r["sample_nbr"], r["amp"]): r for r in rows if r["case"] in FLOORS}
    for r in rows:
        f = floor.get((r["section"], r["shape"], r["sample_nbr"], r["amp"]))
        r["ratio"] = {}
        if not f:
            continue
        for mode in ("train", "infer"):
            a, b = r.get(mode), f.get(mode)
            if a and b:
                m = b["median_ms"]
                r["ratio"][mode] = {"median": a["median_ms"] / m, "q1": a["q1_ms"] / m, "q3": a["q3_ms"] / m}
        a, b = r.get("memory"), f.get("memory")
        if a and b:
            for k in ("saved_extra_bytes", "peak_bytes"):
                if b[k] > 0:
                    r["ratio"][k] = a[k] / b[k]
    return rows


def _f(x, nd=1):
    if x is None:
        return ""
    return f"{x:.{nd}f}" if x < 100 else f"{x:.0f}"


def _x(x):
    return "" if x is None else (f"{x:.2f}x" if x < 10 else f"{x:.1f}x")


def layers_markdown(rows):
    head = ("| shape (B x I x O) | S | prec | layer | KL | train ms | x Linear | IQR x | n | infer ms "
            "| x Linear | extra saved MB | x | peak MB | x |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        rt, tr, inf, mem = r.get("ratio", {}), r.get("train"), r.get("infer"), r.get("memory")
        label = r["label"] + (f" ({r['note']})" if r.get("note") else "")
        cells = [r["shape"], str(r["sample_nbr"]), r["amp"], label, r["kl"]]
        cells += [_f(tr and tr["median_ms"]), _x(rt.get("train", {}).get("median")),
                  (f"{rt['train']['q1']:.2f}-{rt['train']['q3']:.2f}" if "train" in rt else ""),
                  str(tr["n"]) if tr else ""]
        cells += [_f(inf and inf["median_ms"]), _x(rt.get("infer", {}).get("median"))]
        cells += [_f(mem and mem["saved_extra_bytes"] / MB), _x(rt.get("saved_extra_bytes")),
                  _f(mem and mem["peak_bytes"] / MB), _x(rt.get("peak_bytes"))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def other_markdown(rows):
    """One line per bayes_ext variant: its ratio to the torch.nn layer, the target, BLiTZ's ratio."""
    head = ("| layer | shape | prec | nn layer ms | n | bayes_ext | KL | train ms | x nn | IQR x | n | target "
            "| BLiTZ 0.2.8 ms | x nn | n |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    groups = {}
    for r in rows:
        groups.setdefault((r["layer"], r["shape"], r["amp"]), {})[r["case"]] = r
    for (layer, shape, amp), g in groups.items():
        nn_r, bl = g.get("nn"), g.get("blitz")
        nn_t = nn_r and nn_r.get("train")
        bl_cells = ["", "", ""]
        if bl is not None:
            bt, brt = bl.get("train"), bl.get("ratio", {}).get("train")
            bl_cells = ([_f(bt["median_ms"]), _x(brt and brt["median"]), str(bt["n"])] if bt
                        else [bl.get("note") or "no result", "", ""])
        nn_cells = [_f(nn_t["median_ms"]) if nn_t else (nn_r or {}).get("note", "no result"),
                    str(nn_t["n"]) if nn_t else ""]
        for case in ("bayes_ext_cf", "bayes_ext"):
            r = g.get(case)
            if r is None:
                continue
            t, rt = r.get("train"), r.get("ratio", {}).get("train")
            name = r["label"].replace("bayes_ext", "").strip() or "default"
            if r.get("note"):
                name += f" ({r['note']})"
            tgt = ""
            if r.get("target"):
                tgt = f"{r['target']:g}x" + ("" if not rt else " met" if rt["median"] <= r["target"] else " missed")
            cells = [layer, shape, amp, nn_cells[0], nn_cells[1], name, r["kl"],
                     _f(t and t["median_ms"]), _x(rt and rt["median"]),
                     f"{rt['q1']:.2f}-{rt['q3']:.2f}" if rt else "", str(t["n"]) if t else "", tgt]
            out.append("| " + " | ".join(cells + bl_cells) + " |")
    return "\n".join(out)


def elbo_markdown(rows):
    """The sample_elbo rows: time per training step and the speedup over the loop."""
    head = "| model | S | threads | sample_elbo | train ms | IQR ms | n | x faster than loop | target |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t, sp = r.get("train"), r.get("speedup")
        tgt = ""
        if r.get("target"):
            tgt = f"{r['target']:g}x" + ("" if sp is None else " met" if sp >= r["target"] else " missed")
        label = r["label"] + (f" ({r['note']})" if r.get("note") else "")
        cells = [r["shape"], str(r["sample_nbr"]), str(r.get("threads", "")), label, _f(t and t["median_ms"], 2),
                 f"{t['q1_ms']:.2f}-{t['q3_ms']:.2f}" if t else "", str(t["n"]) if t else "",
                 "" if r["case"] == "loop" or sp is None else _x(sp), tgt]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def ops_markdown(ops):
    copy_key = "copy_ (same bytes)"  # CUDA only: issue 8's floor for the op
    has_copy = any(copy_key in row for row in ops.values())
    out = ["| O x I | op | median ms | min-max ms | x torch.add | x torch.randn |" + (" x copy_ |" if has_copy else ""),
           "|---|---|---|---|---|---|" + ("---|" if has_copy else "")]
    for shape, row in ops.items():
        add, rnd = row["torch.add(out=)"]["median_ms"], row["torch.randn(out=)"]["median_ms"]
        copy = row.get(copy_key, {}).get("median_ms")
        for op, s in row.items():
            out.append(f"| {shape} | {op} | {s['median_ms']:.3f} | {s['min_ms']:.3f}-{s['max_ms']:.3f} "
                       f"| {_x(s['median_ms'] / add)} | {_x(s['median_ms'] / rnd)} |"
                       + (f" {_x(s['median_ms'] / copy) if copy else ''} |" if has_copy else ""))
    return "\n".join(out)


def machine_markdown(info, config):
    lines = [f"- date: {info['date']}", f"- device: {info['device']}"
             + (f" ({info.get('gpu')}, CUDA {info.get('cuda')})" if info["device"] == "cuda" else ""),
             f"- CPU: {info['cpu_model']} ({info['usable_cores']} usable of {info['logical_cores']} "
             f"logical cores; {', '.join(info['cpu_flags']) or 'no AVX2'})",
             f"- torch {info['torch']}, {info['torch_threads']} threads, Python {info['python']}",
             f"- bayes_ext {info['packages'].get('bayes_ext')}: extension "
             f"{'loaded' if info.get('bayes_ext_extension') else 'not loaded'}"
             + (f", CPU kernels {info['bayes_ext_cpu_isa']}" if info.get("bayes_ext_cpu_isa") else ""),
             "- references: " + ", ".join(f"{k} {v or 'missing'}" for k, v in info["packages"].items()
                                          if k != "bayes_ext"),
             f"- run: {config['mode']}, warm-up {config['warmup']}, {config['budget_s']} s per case "
             f"(at most {config['cap_s']:g} s), repeats {config['min_reps']}-{config['max_reps']}, "
             f"interleaved round-robin"]
    return "\n".join(lines)


def markdown(result):
    parts = [f"# bayes_ext layer benchmark ({result['machine']['device']})", "",
             machine_markdown(result["machine"], result["config"]), "",
             "Times: median of a training step (zero_grad, S forwards, sum(out) + KL, one backward) and "
             "of one no_grad sampled forward; `x Linear` is the ratio to nn.Linear in the same run, "
             "`IQR x` its quartiles. Memory from one training step (CPU: in a fresh process per case): "
             "`extra saved` = bytes autograd saved for backward outside the model's own parameters "
             "and buffers; `peak` = peak RSS (CPU) or max_memory_allocated (CUDA) above model + input.",
             "", "## Single layers", "",
             layers_markdown([r for r in result["rows"] if r["section"] == "layer"])]
    tf = [r for r in result["rows"] if r["section"] == "transformer"]
    if tf:
        parts += ["", "## Transformer (training step)", "", result.get("transformer_desc", ""), "",
                  layers_markdown(tf)]
    other = [r for r in result["rows"] if r["section"] == "other"]
    if other:
        parts += ["", "## Other layers (training step)", "",
                  "Each bayes_ext layer against its torch.nn counterpart (nn.Conv2d, nn.LSTM / nn.GRU with "
                  "batch_first=True, nn.Embedding), timed interleaved in the same run; a training step is "
                  "zero_grad, one forward, sum(out) + KL (RNNs: the output sequence), backward. `x nn` = "
                  "train median / the nn layer's, `IQR x` its quartiles; BLiTZ's ratio to the same nn "
                  "row beside it. Targets (issue 4) are reported, not asserted.", "",
                  other_markdown(other)]
    elbo = [r for r in result["rows"] if r["section"] == "elbo"]
    if elbo:
        parts += ["", "## Multi-sample ELBO (training step)", "",
                  "The seed's regression model (BayesianLinear 13 -> 512 -> ReLU -> 1, batch 16, MSE, fp32): "
                  "zero_grad, `sample_elbo(x, y, MSELoss(), S)`, backward, with `vectorized=False` (S "
                  "sequential forwards) and `vectorized=True` (one batched forward, same seeds, loss and "
                  "gradients), timed interleaved; the same model with `estimator=\"lrt\"` layers beside it. "
                  "Target (issue 5): 3x at S=8 for the default layers, reported, not asserted.", "",
                  elbo_markdown(elbo)]
    if result.get("ops"):
        parts += ["", "## Sampling op alone", "", ops_markdown(result["ops"])]
    if result.get("notes"):
        parts += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(parts) + "\n"


class PlainBar:
    """Stand-in for tqdm where it is not installed: prints status changes as lines."""

    def __init__(self, total=0, file=None, **_):
        self.total, self.n, self.file = total, 0, file

    def update(self, k=1):
        self.n += k

    def set_postfix_str(self, text, **_):
        print(f"[{self.n}/{self.total}] {text}", file=self.file, flush=True)

    def refresh(self):
        pass

    def close(self):
        pass

    @staticmethod
    def write(text):
        print(text, flush=True)


def chart(rows, path):
    try:
        import matplotlib
    except ImportError:  # the tables and JSON still get written
        return None
    matplotlib.use("Agg")  # no display on CI / servers
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in rows if r["case"] not in FLOORS and r.get("ratio")]
    if not rows:
        return None
    labels = [(f"{r['layer']} {r['amp']} | {r['label']}" if r["section"] == "other" else
               f"{r['shape']} S={r['sample_nbr']} {r['amp']} | {r['label']}") for r in rows]
    series = [("train time x nn.Linear (other layers: x their nn layer)",
               [r["ratio"].get("train", {}).get("median") for r in rows]),
              ("peak memory x nn.Linear", [r["ratio"].get("peak_bytes") for r in rows]),
              ("extra saved bytes x nn.Linear", [r["ratio"].get("saved_extra_bytes") for r in rows])]
    fig, axes = plt.subplots(1, 3, figsize=(18, 0.28 * len(rows) + 1.5), sharey=True)
    colors = {c: f"C{i}" for i, c in enumerate(cases.CASES)}
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
    for ax, (title, vals) in zip(axes, series):
        ys = list(range(len(rows)))
        # Bars grow from 1x (parity with nn.Linear), so "cheaper than Linear" points left.
        ax.barh(ys, [(v - 1) if v else 0 for v in vals], left=1,
                color=[colors.get(r["case"], "C9") for r in rows])
        for y, v in zip(ys, vals):
            if v:
                ax.text(v, y, f" {v:.0f}x " if v >= 100 else f" {v:.3g}x ", va="center",
                        ha="left" if v >= 1 else "right", fontsize=6)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(list(range(len(rows))))
    axes[0].set_yticklabels(labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result, out_dir, stem):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(base + ".md", "w") as f:
        f.write(md)
    png = chart(result["rows"], base + ".png")
    return base + ".json", base + ".md", png, md
