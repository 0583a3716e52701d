"""One benchmark workload: a model, its input, and the training / inference step that is timed.

A spec is a plain dict (so it can be sent to a worker process):
  kind: "layer" | "transformer" | "other";  case: a key of cases.CASES (layer_cases.VARIANTS for "other")
  shape: [batch, in, out] (layer), transformer config dict incl. batch/tokens (transformer), or a
  layer_cases config dict (other: conv2d / lstm / gru / embedding)
  sample_nbr: forwards per training step;  device: "cpu" | "cuda";  amp: "fp32" | "bf16"
"""
import contextlib

import torch

import cases
import layer_cases
import transformer


class Workload:
    def __init__(self, spec):
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.sample_nbr = spec.get("sample_nbr", 1)
        self.amp = spec.get("amp", "fp32")
        name = spec["case"]
        if spec["kind"] == "layer":
            batch, in_f, out_f = spec["shape"]
            self.model = cases.make_linear(name, in_f, out_f)
            self.fwd = cases.layer_forward(name)
            x = torch.randn(batch, in_f)
        elif spec["kind"] == "other":
            self.model, x = layer_cases.make_layer(name, spec["shape"])
            self.fwd = layer_cases.forward
        else:
            cfg = dict(spec["shape"])
            self.model = transformer.build_transformer(
                lambda i, o: cases.make_linear(name, i, o),
                **{k: cfg[k] for k in ("n_blocks", "d_model", "n_heads", "d_mlp")})
            kl_fn = cases.model_kl_fn(name)
            self.fwd = lambda m, x, need_kl: (m(x), kl_fn(m) if need_kl else None)
            x = transformer.transformer_input(**cfg)
        self.model.to(self.device).train()
        # The input needs grad as it would inside a network, so backward also computes dL/dx
        # (not token ids: an embedding's input is integer).
        self.x = x.to(self.device)
        if self.x.is_floating_point():
            self.x.requires_grad_(True)

    def autocast(self, cache_enabled=True):
        """bf16 autocast for amp "bf16" (cache_enabled=False inside a CUDA graph capture, as
        torch.cuda.make_graphed_callables asks), else nothing."""
        if self.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self):
        """zero_grad, sample_nbr forwards with summed losses, one backward (as BLiTZ's sample_elbo)."""
        self.model.zero_grad(set_to_none=True)
        self.x.grad = None
        self.loss().backward()

    def loss(self, cache_enabled=True):
        """The training loss: the mean over sample_nbr forwards of sum(out) + KL."""
        loss = 0.0
        for _ in range(self.sample_nbr):
            with self.autocast(cache_enabled):
                out, kl = self.fwd(self.model, self.x, True)
                term = out.float().sum()
                if kl is not None:
                    term = term + kl.float().sum()
            loss = loss + term
        return loss / self.sample_nbr

    def infer_step(self):
        """One sampled prediction without autograd (a single Monte Carlo forward)."""
        with torch.no_grad(), self.autocast():
            self.fwd(self.model, self.x, False)

    def state_storages(self):
        """data_ptrs of the model's own parameter and buffer storages (not extra forward memory)."""
        ptrs = set()
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            ptrs.add(t.untyped_storage().data_ptr())
        return ptrs

    def state_bytes(self):
        seen = {}
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())


def build(spec):
    if spec["kind"] == "elbo":  # sample_elbo loop vs vectorised (elbo_cases.py)
        import elbo_cases
        return elbo_cases.ElboWorkload(spec)
    return Workload(spec)
