"""Throwaway variants of the layer-wise calibration, measured once and not adopted (docs/calibration/objective.md,
"Calibration variants that did not help"). Not library code: each variant patches ``peft_lisa.calibration``'s
internals, then runs ``examples/calibration_curves.py`` with the arguments given after ``--variant``.

* ``output``: minimise the relative squared error of the layer's attention output after ``o_proj``,
  ``||softmax(S_lisa + M) V W_o - softmax(S_base + M) V W_o||^2 / ||softmax(S_base + M) V W_o||^2``, instead of the
  attention KL;
* ``kl+output``: the attention KL plus that error;
* ``sequential``: fit layer ``l`` on the inputs the *adapted* model gives it (the shared layers before it already
  calibrated), its source logits recomputed from those inputs too, against the base layer's attention on the base
  model's inputs (as GPTQ/SparseGPT's sequential mode);
* ``sequential-own``: the same, with the teacher the base layer's attention on the adapted inputs.

Run from the repository root, e.g.::

    PYTHONPATH=.:examples taskset -c 0 python docs/calibration/variants/calibration_variants.py --variant output \
        --threads 1 --share-layers 5,6,7,9,13,15,16,18,21,22,25,26,27,28,29 --calibration 32:100 --objectives \
        --steps 0 --loop-prompts 16 --out docs/calibration/variants/output
"""

from __future__ import annotations

import dataclasses
import runpy
import sys

import torch

import peft_lisa
import peft_lisa.calibration as cal
from peft_lisa.tuner.layer import LiSALayer

VARIANTS = ("output", "kl+output", "sequential", "sequential-own")


class OutputTeacher(cal.TeacherRows):
    """The teacher's rows, scored by the attention output's error (``kl_too``: plus the KL)."""

    def kl(self, student_logits: torch.Tensor) -> torch.Tensor:
        student = torch.softmax(student_logits.float() + self.mask, dim=-1)  # B x H x T x T
        error = ((self.project(student) - self.target) ** 2).mean() / self.scale
        return super().kl(student_logits) + error if self.kl_too else error


def output_teacher(kl_too: bool):
    kl_teacher = cal._Layerwise.teacher

    def teacher(self, layer, batch):
        rows = kl_teacher(self, layer, batch)
        attn, hidden = self.wrappers[layer].base_layer, batch.hidden[layer]
        batch_size, length, _ = hidden.shape
        with torch.no_grad():
            value = attn.v_proj(hidden).view(batch_size, length, -1, attn.head_dim).transpose(1, 2).float()
            value = value.repeat_interleave(rows.probs.shape[1] // value.shape[1], dim=1)  # B x H x T x d_h

        def project(probs: torch.Tensor) -> torch.Tensor:  # B x H x T x T -> B x T x hidden
            heads = (probs @ value).transpose(1, 2).reshape(batch_size, length, -1)
            return attn.o_proj(heads.to(attn.o_proj.weight.dtype)).float()

        result = OutputTeacher(rows.probs, rows.neg_entropy, rows.valid, rows.mask)
        result.project, result.kl_too = project, kl_too
        with torch.no_grad():
            result.target = project(rows.probs)
            result.scale = (result.target**2).mean().clamp(min=1e-12)
        return result

    cal._Layerwise.teacher = teacher


def sequential(own_teacher: bool) -> None:
    state: dict = {}
    calibrate, record, fit = cal.calibrate, cal._record_batches, cal._fit_layer

    def calibrate_keeping_model(peft_model, tokenizer, texts, **kwargs):
        state["model"] = peft_model
        return calibrate(peft_model, tokenizer, texts, **kwargs)

    def record_with_ids(peft_model, wrappers, ids, batch_size):
        for index, batch in enumerate(record(peft_model, wrappers, ids, batch_size)):
            batch.ids, batch.adapted = ids[index * batch_size : (index + 1) * batch_size], {}
            yield batch

    def adapted_inputs(work, upto: int) -> None:
        """Record every wrapped layer's input up to ``upto`` from the adapter-enabled model, batch by batch."""
        model = state["model"]
        wrappers = [m for m in model.modules() if isinstance(m, LiSALayer)]
        for batch in work.batches:
            got: dict = {}

            def hook(module, args, kwargs, got=got):
                got[module.layer_idx] = (args[0] if args else kwargs["hidden_states"]).detach()
                if module.layer_idx == upto:
                    raise cal._StopForward

            handles = [w.register_forward_pre_hook(hook, with_kwargs=True) for w in wrappers]
            try:
                with torch.no_grad():
                    model(input_ids=batch.ids, use_cache=False)
            except cal._StopForward:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            batch.adapted = got

    def fit_on_adapted_inputs(work, layer, **kwargs):
        adapted_inputs(work, layer)
        return fit(work, layer, **kwargs)

    def on_adapted_inputs(batch):
        """The batch with the adapted model's inputs in place of the base model's."""
        return dataclasses.replace(batch, hidden=batch.adapted)

    source, loss, teacher = cal._Layerwise.source, cal._Layerwise.loss, cal._Layerwise.teacher
    cal._Layerwise.source = lambda self, layer, batch: source(self, layer, on_adapted_inputs(batch))
    cal._Layerwise.loss = lambda self, layer, batch, *targets: loss(self, layer, on_adapted_inputs(batch), *targets)
    if own_teacher:
        cal._Layerwise.teacher = lambda self, layer, batch: teacher(self, layer, on_adapted_inputs(batch))
    cal.calibrate = peft_lisa.calibrate = calibrate_keeping_model
    cal._record_batches, cal._fit_layer = record_with_ids, fit_on_adapted_inputs


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "--variant" or sys.argv[2] not in VARIANTS:
        choices = ",".join(VARIANTS)
        raise SystemExit(f"usage: calibration_variants.py --variant {{{choices}}} <calibration_curves arguments>")
    variant = sys.argv[2]
    if variant in ("output", "kl+output"):
        output_teacher(kl_too=variant == "kl+output")
    else:
        sequential(own_teacher=variant == "sequential-own")
    sys.argv = ["calibration_curves.py", *sys.argv[3:]]
    runpy.run_path("examples/calibration_curves.py", run_name="__main__")


if __name__ == "__main__":
    main()
