"""DFQ (FracTrain, Fu et al. 2020): the gate's straight-through gradient, per-sample BitOPs
against a hand count, the cost regulariser's sign and band, one option for the whole batch
against static quantization at that option, and a run with its metrics and resume."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from symmetric_int8 import killed_and_resumed, small_config
from torch import nn

from qtrain.api import quantize_
from qtrain.cost import CostMeter
from qtrain.models import BasicBlock, CifarResNet, build_model
from qtrain.nn import QConv2d
from qtrain.ops import Precision
from qtrain.presets import precision_schedule_quantization
from qtrain.protocol import set_precision
from qtrain.recipes import RecipeConfigError, build_recipe
from qtrain.recipes.dfq import (
    DFQ,
    DFQConfig,
    GateController,
    GatedBlock,
    GatedConv2d,
    _Permute,
    gated_blocks,
    option_cost,
    regulariser_sign,
    straight_through_one_hot,
)
from qtrain.report import write_report
from qtrain.train import read_metrics


def test_straight_through_one_hot_is_one_hot_forward_and_softmax_backward() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    upstream = torch.randn(6, 5)
    mask = straight_through_one_hot(logits)
    assert torch.equal(mask, F.one_hot(logits.argmax(1), 5).float())  # exactly, not ≈
    (mask * upstream).sum().backward()
    reference = logits.detach().clone().requires_grad_()
    (reference.softmax(1) * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=0, atol=0)


def test_the_controller_carries_its_state_from_block_to_block() -> None:
    torch.manual_seed(0)
    controller = GateController(embedding=3, hidden=4, options=2)
    embedding = torch.randn(5, 3)
    controller(embedding)
    first = controller.state[0]
    controller(embedding)
    assert not torch.equal(controller.state[0], first)  # same input, another state
    controller.reset()
    controller(embedding)
    assert torch.equal(controller.state[0], first)


def test_option_cost_by_hand() -> None:
    assert option_cost(6, 12, 4) * 1024 == 6 * 4 + 12 * 4 + 6 * 12
    assert option_cost(4, 8, None) * 1024 == 4 * 4 + 8 * 4 + 4 * 8  # weights at forward bits


def test_regulariser_sign_and_band() -> None:
    # band 0 (the authors' default relax): the sign alone.
    assert [regulariser_sign(cp, 3.0, 0.0) for cp in (2.99, 3.0, 3.01)] == [-1.0, 1.0, 1.0]
    # With a band, ±0.1 inside it on either side of the target.
    assert [regulariser_sign(cp, 3.0, 0.5) for cp in (2.49, 2.5, 2.99, 3.0, 3.49, 3.5)] == [
        -1.0, -0.1, -0.1, 0.1, 0.1, 1.0,
    ]  # fmt: skip


class TwoBlocks(nn.Module):
    """A stem, two 4-channel basic blocks (identity shortcuts), a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 4))
        self.classifier = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.stem(x)).mean((2, 3)))


def force(model: nn.Module, monkeypatch: pytest.MonkeyPatch, *choices: list[int]) -> None:
    """Make the gates choose ``choices[b][i]`` for sample i at block b (one forward)."""
    controller = gated_blocks(model)[0][1].controller
    masks = iter(
        F.one_hot(torch.tensor(c), controller.logits.out_features).float() for c in choices
    )
    monkeypatch.setattr(controller, "forward", lambda _embedding: next(masks))


def test_per_sample_bitops_of_a_two_block_model_equal_a_hand_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    recipe = DFQ(DFQConfig(metrics_interval=1))  # options (3,6) (4,6) (4,8) (6,8) (6,12), w 4
    model = recipe.prepare(TwoBlocks())
    convs = [m for m in model.modules() if isinstance(m, GatedConv2d)]
    assert len(convs) == 4
    meters = [CostMeter(conv) for conv in convs]
    force(model, monkeypatch, [0, 0, 3, 4], [1, 1, 1, 2])
    model(torch.randn(4, 1, 4, 4)).sum().backward()
    macs = 4 * 4 * 4 * (4 * 9)  # per sample and conv: 4×4 pixels × 4 out × 4 in × 3×3
    # Per sample and conv, forward b·w, grad-input g·w, grad-weight g·b (w = 4):
    # block 1: 3/6, 3/6, 6/8, 6/12; block 2: 4/6 ×3, 4/8. Two convs per block.
    forward = 2 * macs * ((3 + 3 + 6 + 6) * 4 + (4 + 4 + 4 + 4) * 4)
    grad_input = 2 * macs * ((6 + 6 + 8 + 12) * 4 + (6 + 6 + 6 + 8) * 4)
    grad_weight = 2 * macs * ((18 + 18 + 48 + 72) + (24 + 24 + 24 + 32))
    costs = [meter.pop() for meter in meters]
    by_role = {role: sum(c.bitops[role] for c in costs) for role in costs[0].bitops}
    assert by_role == {"forward": forward, "grad_input": grad_input, "grad_weight": grad_weight}
    assert sum(c.macs["forward"] for c in costs) == 4 * 4 * macs
    # The regulariser's cp is the same count: % of these MACs at 32×32 in all three products.
    recipe.extra_loss(model)
    recipe.sync()
    cp = 100 * (forward + grad_input + grad_weight) / (3 * 32 * 32 * 4 * 4 * macs)
    assert recipe.metrics()["cp"] == pytest.approx(cp)


def test_the_task_loss_reaches_every_gate_through_the_chosen_option() -> None:
    torch.manual_seed(0)
    model = DFQ().prepare(TwoBlocks())
    model(torch.randn(8, 1, 4, 4)).square().sum().backward()
    for _, block in gated_blocks(model):
        assert block.gate[1].weight.grad.abs().sum() > 0  # each block's own 1×1 conv
    controller = gated_blocks(model)[0][1].controller
    assert all(p.grad.abs().sum() > 0 for p in controller.parameters())


def test_regulariser_pushes_the_gates_toward_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    def logit_gradient(target_cp: float) -> torch.Tensor:
        torch.manual_seed(0)
        recipe = DFQ(DFQConfig(target_cp=target_cp))
        model = recipe.prepare(TwoBlocks())
        model(torch.randn(8, 1, 4, 4))
        loss = recipe.extra_loss(model)
        controller = gated_blocks(model)[0][1].controller
        (bias,) = torch.autograd.grad(loss, controller.logits.bias)
        return loss.detach(), bias

    costs = torch.tensor(DFQ().option_costs)  # (3,6) (4,6) (4,8) (6,8) (6,12) at w = 4
    low, high = DFQConfig().cp_range()
    above, toward_cheaper = logit_gradient(low)  # a mix of options costs more than the cheapest
    below, toward_dearer = logit_gradient(high)  # and less than the dearest
    assert above > 0 and below < 0 and torch.allclose(above, -below)
    torch.testing.assert_close(toward_cheaper, -toward_dearer)
    # Descending the gradient moves probability from the dearest option to the cheapest.
    assert toward_cheaper[costs.argmax()] > 0 > toward_cheaper[costs.argmin()]


@pytest.mark.parametrize("option", [0, 3])
def test_one_option_for_the_whole_batch_equals_static_quantization(option: int) -> None:
    """All samples at option k: outputs and gradients are those of the same layers quantized
    statically at option k's bits (the quantizer CPT and PFQ use)."""
    torch.manual_seed(0)
    plain = CifarResNet(1, 3, depth=8, base_channels=4)
    static = copy.deepcopy(plain)
    recipe = DFQ()
    gated = recipe.prepare(plain)
    controller = gated_blocks(gated)[0][1].controller
    with torch.no_grad():  # the gates' logits: option k, whatever the input
        controller.logits.weight.zero_()
        controller.logits.bias.copy_(100 * F.one_hot(torch.tensor(option), 5))
    float_layers = {"stem.0", "classifier"} | {
        f"stages.{s}.0.shortcut.0" for s in (1, 2)
    }  # fmt: skip
    quantize_(static, precision_schedule_quantization(6, 12), lambda _m, n: n not in float_layers)
    set_precision(static, Precision(forward=(3, 4, 4, 6, 6)[option],
                                    backward=(6, 6, 8, 8, 12)[option], weight=4))  # fmt: skip
    assert sum(isinstance(m, QConv2d) for m in static.modules()) == 6
    x, weights = torch.randn(6, 1, 8, 8), torch.randn(6, 3)
    results = []
    for model in (gated, static):
        torch.manual_seed(1)  # the gradients' stochastic rounding draws alike
        out = model(x)
        (out * weights).sum().backward()
        grads = {n.replace(".block.", "."): p.grad for n, p in model.named_parameters()}
        results.append((out, grads))
    assert all(b.last_counts[option] == 6 for _, b in gated_blocks(gated))
    (out_gated, grads_gated), (out_static, grads_static) = results
    torch.testing.assert_close(out_gated, out_static, rtol=0, atol=0)
    for name, grad in grads_static.items():
        torch.testing.assert_close(grads_gated[name], grad, rtol=0, atol=0, msg=name)


def test_prepare_gates_every_basic_block_and_keeps_stem_shortcuts_and_classifier_float() -> None:
    model = DFQ().prepare(build_model("resnet20", input_shape=(3, 8, 8), num_classes=10,
                                      base_channels=4))  # fmt: skip
    blocks = gated_blocks(model)
    assert len(blocks) == 9
    assert type(model.stem[0]) is nn.Conv2d and type(model.classifier) is nn.Linear
    assert type(model.stages[1][0].block.shortcut[0]) is nn.Conv2d
    assert all(type(b.block.conv1) is GatedConv2d and type(b.block.conv2) is GatedConv2d
               for _, b in blocks)  # fmt: skip
    assert all(type(m) is nn.Conv2d for _, b in blocks for m in b.gate.modules()
               if isinstance(m, nn.Conv2d))  # fmt: skip
    controllers = [k for k in model.state_dict() if ".controller." in k]
    assert controllers and all(k.startswith("stages.0.0.controller.") for k in controllers)
    with pytest.raises(RecipeConfigError, match="gates residual blocks"):
        DFQ().prepare(build_model("resnet9", input_shape=(3, 8, 8), num_classes=10, width=4))


def test_quantized_stem_and_shortcuts_run_at_the_top_option() -> None:
    recipe = build_recipe("dfq", {"full_precision_stem": "false",
                                  "full_precision_downsample": "false"})  # fmt: skip
    model = recipe.prepare(CifarResNet(1, 3, depth=8, base_channels=4))
    assert isinstance(model.stem[0], QConv2d) and not isinstance(model.stem[0], GatedConv2d)
    assert isinstance(model.stages[1][0].block.shortcut[0], QConv2d)
    set_precision(model, recipe.schedule(0, 1))
    assert model.stem[0].role_bits()["forward"] == (6, 4)
    assert model.stem[0].role_bits()["grad_weight"] == (12, 6)


def test_config_is_validated() -> None:
    with pytest.raises(RecipeConfigError, match="one length"):
        DFQConfig(forward_bits=(3, 4), backward_bits=(6,))
    with pytest.raises(RecipeConfigError, match="forward_bits item"):
        DFQConfig(forward_bits=(1, 4), backward_bits=(6, 6))
    with pytest.raises(RecipeConfigError, match="target_cp"):
        DFQConfig(target_cp=-1.0)
    assert DFQConfig().cp_range() == (100 * 54 / 1024 / 3, 100 * 144 / 1024 / 3)


def test_a_target_the_options_cannot_reach_is_warned_of() -> None:
    # All at 6/12 bits with 4-bit weights: 4.69. Warned (and a run event), not refused, so a
    # run saved with such a target still loads.
    with pytest.warns(UserWarning, match=r"target_cp = 5 is outside .*\[1\.758, 4\.688\]"):
        recipe = DFQ(DFQConfig(target_cp=5.0))
    (event,) = recipe.events()
    assert event["event"] == "unreachable_target" and "4.688" in event["why"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DFQ(DFQConfig(target_cp=3.0)).events() == []
    assert build_recipe("dfq", {"forward_bits": "4,8", "backward_bits": "8,8"}).options == [
        Precision(forward=4, backward=8, weight=4),
        Precision(forward=8, backward=8, weight=4),
    ]


def test_a_run_logs_cp_and_gate_decisions_and_resumes_exactly(tmp_path: Path) -> None:
    config = small_config(model="resnet20", width=None, model_kwargs={"base_channels": 4},
                          epochs=1, checkpoint_every=4)  # fmt: skip
    # Checkpointed at step 4, one step into the second metrics interval; killed at step 6.
    killed_and_resumed(config, lambda: DFQ(DFQConfig(metrics_interval=3)), 6, tmp_path)
    records = read_metrics(tmp_path / "straight")
    changes = [r["metrics"] for r in records if r["kind"] == "metrics"]
    last = changes[-1]
    assert 0 < last["cp"] < 100 and last["target_cp"] == 3.0
    names = ["option0_fw3_bw6", "option1_fw4_bw6", "option2_fw4_bw8", "option3_fw6_bw8",
             "option4_fw6_bw12"]  # fmt: skip
    shares = [last[name] for name in names]
    assert len(shares[0]) == 9  # the blocks of resnet20
    for block in shares[0]:
        assert sum(share[block] for share in shares) == pytest.approx(1.0)
    report = write_report(tmp_path / "straight").read_text()
    assert "metrics_option0_fw3_bw6.png" in report
    assert (tmp_path / "straight" / "metrics_option0_fw3_bw6.png").exists()


def test_gated_block_puts_the_outputs_back_in_input_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed options: each sample's output is its own, whatever the runs' order."""
    torch.manual_seed(0)
    model = DFQ().prepare(TwoBlocks())
    x = torch.randn(4, 1, 4, 4)
    force(model, monkeypatch, [0, 1, 2, 3], [4, 3, 2, 1])
    model(x)  # training: the inputs' running ranges, which evaluation quantizes with
    model.eval()
    force(model, monkeypatch, [4, 0, 4, 0], [2, 2, 1, 1])
    mixed = model(x)
    for i in range(4):  # each sample alone, at its options
        force(model, monkeypatch, [[4, 0, 4, 0][i]], [[2, 2, 1, 1][i]])
        torch.testing.assert_close(model(x[i : i + 1]), mixed[i : i + 1])
    assert isinstance(gated_blocks(model)[0][1], GatedBlock)


def test_sync_sums_the_step_over_the_ranks(tmp_path: Path) -> None:
    """A one-rank process group: the reduced statistics are the step's own."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        shown = []
        for group in (None, dist.group.WORLD):
            torch.manual_seed(0)
            recipe = DFQ(DFQConfig(metrics_interval=1))
            model = recipe.prepare(TwoBlocks())
            model(torch.randn(8, 1, 4, 4))
            recipe.extra_loss(model)
            recipe.sync(group)
            shown.append(recipe.metrics())
    finally:
        dist.destroy_process_group()
    assert shown[0] == shown[1] and "cp" in shown[0]


def test_the_batch_permutation_backward_is_the_inverse_gather() -> None:
    order = torch.tensor([2, 0, 3, 1])
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _Permute.apply(t, order, torch.argsort(order)), (x,))
