"""A custom op's inputs, kept for a recorded backward (_recorded.py) as saved tensors.

A recorded backward (create_graph=True) differentiates the op's forward rebuilt on its inputs, so
the op keeps them. As a plain ctx attribute they stayed alive under torch.utils.checkpoint, which
drops what autograd saved and recomputes it: a checkpointed Bayesian conv kept its input
activation. Kept as saved tensors (the op's own where its setup_context saved them, which most do,
else saved after those) they go through the saved-tensor hooks like everything else.

Under checkpoint each saved tensor may be unpacked once, and the first unpack recomputes the
checkpointed forward, whose ops (the user's too) must record autograd: ``holding_saved_tensors``
unpacks them once, above any below-autograd guard, for the whole backward call.
"""
import torch


def setup_keeping_inputs(setup_context, ctx, inputs, output) -> None:
    """``setup_context(ctx, inputs, output)``, and the tensor inputs kept as saved tensors."""
    setup_context(ctx, inputs, output)
    # what it saved: save_for_backward keeps its tensors in ctx.to_save until the forward returns
    op_saved = getattr(ctx, "to_save", None) or ()
    # each tensor input as the position of its saved tensor: the op's own where it saved it (most
    # save all their inputs), else one saved after them; the other inputs as they are (a reference
    # to a tensor here would keep it alive)
    extra, positions, constants = [], [], list(inputs)
    for i, value in enumerate(inputs):
        if isinstance(value, torch.Tensor):
            for j, saved in enumerate(op_saved):
                if saved is value:
                    break
            else:
                j = len(op_saved) + len(extra)
                extra.append(value)
            positions.append((i, j))
            constants[i] = None
    if extra:
        ctx.save_for_backward(*op_saved, *extra)
    ctx.kept_inputs = (len(op_saved), positions, constants)


def _unpacked(ctx):
    held = getattr(ctx, "held_saved_tensors", None)
    return held if held is not None else ctx.saved_tensors


def saved_tensors(ctx):
    """What the op's setup_context saved (a backward's ``ctx.saved_tensors``)."""
    kept = getattr(ctx, "kept_inputs", None)
    tensors = _unpacked(ctx)
    return tensors if kept is None else tensors[:kept[0]]


def forward_inputs(ctx):
    """The op's inputs: kept by setup_keeping_inputs, or as ``ctx.forward_inputs`` (the torch.func
    twins' jvp, which cannot read saved tensors); None where none were kept (torch.compile)."""
    inputs = getattr(ctx, "forward_inputs", None)
    kept = getattr(ctx, "kept_inputs", None)
    if inputs is not None or kept is None:
        return inputs
    _, positions, values = kept
    values, unpacked = list(values), _unpacked(ctx)
    for i, j in positions:
        values[i] = unpacked[j]
    return tuple(values)


class holding_saved_tensors:
    """Around a backward call: the saved tensors unpacked once, here, and held until it returns
    (nested uses hold nothing more). A class: a generator-based context manager costs ~1 us."""

    __slots__ = ("ctx", "holds")

    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        self.holds = getattr(self.ctx, "held_saved_tensors", None) is None
        if self.holds:
            self.ctx.held_saved_tensors = self.ctx.saved_tensors

    def __exit__(self, *exc):
        if self.holds:  # (held beyond the call they would keep the outputs' graph in a cycle)
            self.ctx.held_saved_tensors = None
        return False
