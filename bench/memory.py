"""Memory of one training step, measured in a fresh child process (see workers.call_in_child).

Two measures:
- saved for backward: every tensor autograd packs (torch.autograd.graph.saved_tensors_hooks),
  counted once per storage. "all" includes the model's parameters/buffers that autograd keeps a
  reference to; "extra" excludes them: the memory a training forward keeps alive until backward.
- peak: CUDA torch.cuda.max_memory_allocated; CPU the kernel's peak resident set (VmHWM, reset via
  /proc/self/clear_refs, or ru_maxrss where that is not allowed) minus the RSS after the model and
  input were built. Both include the gradients the step allocates.
"""
import gc
import resource

import torch

import workload


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss():
    """True when the kernel's peak-RSS counter could be reset to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(spec):
    dev = torch.device(spec["device"])
    # Prime lazy one-time state (BLAS/oneDNN buffers, autograd threads, CUDA context) on a tiny
    # copy of the case, so that it is not charged to the measured step.
    tiny = dict(spec, kind="layer", shape=[2, 8, 8], sample_nbr=1)
    workload.build(tiny).train_step()
    gc.collect()

    w = workload.build(spec)
    state = w.state_storages()
    saved = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            saved[s.data_ptr()] = max(saved.get(s.data_ptr(), 0), s.nbytes())
        except Exception:  # tensors without a plain storage (none expected here)
            pass
        return t

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method = "cuda max_memory_allocated"
    else:
        method = "VmHWM after clear_refs" if _reset_peak_rss() else "ru_maxrss (peak since start)"
        base = _rss_kb("VmRSS") * 1024

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        w.train_step()
    w.sync()

    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    elif method.startswith("VmHWM"):
        peak = _rss_kb("VmHWM") * 1024 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "saved_all_bytes": sum(saved.values()),
        "saved_extra_bytes": sum(v for p, v in saved.items() if p not in state),
        "peak_bytes": max(peak, 0),
        "state_bytes": w.state_bytes(),
        "peak_method": method,
    }
