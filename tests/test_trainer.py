"""Test-time trainer and stress controller on the tiny-random model."""

import pytest
import torch

from adapters.bank import BankConfig, ExpertBank
from adapters.router import Router, RouterConfig
from adapters.stress import StressConfig, StressController, StressMode
from adapters.trainer import IGNORE_INDEX, TestTimeTrainer, TrainerConfig, TrainingExample
from agents.errors import TrainingError

EXAMPLES = [
    TrainingExample("Q: Tom has 3 apples and buys 5 more. How many?\nA:", " 3 + 5 = 8. The answer is 8"),
    TrainingExample("Q: A box holds 4 pens. How many pens in 3 boxes?\nA:", " 4 * 3 = 12. The answer is 12"),
]


def _trainer(tiny, **config):
    bank = ExpertBank(tiny.model, BankConfig(n_experts=4))
    router = Router(tiny.model.config.hidden_size, 4, RouterConfig(memory_dim=3))
    return TestTimeTrainer(tiny.model, tiny.tokenizer, bank, router, TrainerConfig(**config))


def test_only_adapter_and_router_parameters_change(tiny):
    base_before = [(p, p.detach().clone()) for p in tiny.model.parameters()]  # before injection
    trainer = _trainer(tiny)
    router_before = {k: v.clone() for k, v in trainer.router.state_dict().items()}
    b_before = {n: l.lora_B.clone() for n, l in trainer.bank.layers.items()}
    optimizer = trainer.new_optimizer(lr=1e-2)
    metrics = [trainer.step(EXAMPLES, target_expert=2, optimizer=optimizer, memory=torch.ones(3)) for _ in range(3)]
    for param, value in base_before:
        assert torch.equal(param, value) and not param.requires_grad
    adapter_ids = {id(p) for p in trainer.trainable_parameters()}
    assert not adapter_ids & {id(p) for p, _ in base_before}
    # the target expert moved, the others did not (forced LM routing), and the router learned
    for name, layer in trainer.bank.layers.items():
        assert not torch.equal(layer.lora_B[2], b_before[name][2]), name
        for other in (0, 1, 3):
            assert torch.equal(layer.lora_B[other], b_before[name][other]), (name, other)
    assert any(not torch.equal(v, router_before[k]) for k, v in trainer.router.state_dict().items())
    assert metrics[-1]["loss_lm"] < metrics[0]["loss_lm"]
    for key in ("loss", "loss_lm", "loss_router", "grad_norm", "lr", "tokens_per_s"):
        assert key in metrics[0] and metrics[0][key] == metrics[0][key]  # present and not NaN
    assert metrics[0]["lr"] == pytest.approx(1e-2)


def test_router_learns_the_target_expert(tiny):
    trainer = _trainer(tiny, router_weight=1.0)
    optimizer = trainer.new_optimizer(lr=5e-2)
    for _ in range(8):
        trainer.step(EXAMPLES, target_expert=3, optimizer=optimizer)
    batch = trainer.tokenize(EXAMPLES)
    from adapters.router import context_features

    logits = trainer.router(context_features(tiny.model, trainer.bank, batch.prompt_ids, batch.prompt_mask))
    assert (logits.argmax(-1) == 3).all()


def test_router_routing_mode_trains_all_experts_through_the_mixture(tiny):
    trainer = _trainer(tiny, lm_routing="router")
    optimizer = trainer.new_optimizer(lr=1e-2)
    trainer.step(EXAMPLES, target_expert=0, optimizer=optimizer)
    trainer.step(EXAMPLES, target_expert=0, optimizer=optimizer)
    moved = [bool((layer.lora_B != 0).any(dim=(1, 2)).all()) for layer in trainer.bank.layers.values()]
    assert all(moved)


def test_prompt_tokens_are_masked_out_of_the_loss(tiny):
    trainer = _trainer(tiny)
    batch = trainer.tokenize(EXAMPLES)
    for i, ex in enumerate(EXAMPLES):
        n_prompt = len(tiny.tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
        n_completion = len(tiny.tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + 1  # + eos
        row = batch.labels[i]
        assert (row[:n_prompt] == IGNORE_INDEX).all()
        assert (row != IGNORE_INDEX).sum() == n_completion
        assert row[n_prompt] == batch.input_ids[i, n_prompt]


def test_the_loss_in_micro_batches_is_the_one_batch_mean_over_completion_tokens(tiny):
    trainer = _trainer(tiny, micro_batch=2)
    trainer.step(EXAMPLES, target_expert=1, optimizer=trainer.new_optimizer(lr=1e-2))  # expert 1 no longer zero
    # five texts of unequal completions, so that the micro-batches (2, 2, 1) weigh differently
    examples = EXAMPLES + [TrainingExample(e.prompt, e.completion + " apples" * (i + 1)) for i, e in enumerate(EXAMPLES)]
    examples.append(TrainingExample("Q: 2 + 2?\nA:", " 4"))
    memory = torch.randn(len(examples), 3, generator=torch.Generator().manual_seed(0))  # one row per text
    with torch.no_grad():
        one_batch = trainer._losses(trainer.tokenize(examples), 1, memory)["lm"]
    assert trainer.loss(examples, 1, memory) == pytest.approx(float(one_batch), rel=1e-5)
    assert trainer.loss(examples, 1, memory) != pytest.approx(trainer.loss(examples, 0, memory), rel=1e-5)


def test_nan_loss_is_refused_and_parameters_untouched(tiny):
    trainer = _trainer(tiny)
    optimizer = trainer.new_optimizer(lr=1e-2)
    trainer.step(EXAMPLES, target_expert=1, optimizer=optimizer)  # some state in the optimizer
    before = [p.detach().clone() for p in trainer.trainable_parameters()]
    hook = tiny.model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * float("nan"))
    try:
        with pytest.raises(TrainingError, match="non-finite"):
            trainer.step(EXAMPLES, target_expert=1, optimizer=optimizer)
    finally:
        hook.remove()
    after = trainer.trainable_parameters()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in after)


def test_empty_batch_is_refused(tiny):
    trainer = _trainer(tiny)
    with pytest.raises(TrainingError, match="at least one example"):
        trainer.step([], target_expert=0, optimizer=trainer.new_optimizer(1e-3))


def test_kl_penalty_is_zero_at_step_zero_and_positive_after(tiny):
    trainer = _trainer(tiny, kl_weight=1.0)
    optimizer = trainer.new_optimizer(lr=5e-2)
    first = trainer.step(EXAMPLES, target_expert=0, optimizer=optimizer)
    assert first["loss_kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0: adapted == base
    second = trainer.step(EXAMPLES, target_expert=0, optimizer=optimizer)
    assert second["loss_kl"] > 0


def test_seeded_training_reproduces(tiny):
    from agents.lm.models import load_model

    def run(loaded):
        trainer = _trainer(loaded)
        optimizer = trainer.new_optimizer(lr=1e-2)
        for _ in range(2):
            trainer.step(EXAMPLES, target_expert=1, optimizer=optimizer)
        return [p.detach().clone() for p in trainer.trainable_parameters()]

    a, b = run(tiny), run(load_model("tiny-random"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_stress_modes_follow_phi():
    ctrl = StressController(StressConfig(ema_beta=0.0))  # no smoothing: phi from the last loss
    assert ctrl.phi == 0.0
    ctrl.observe(0.2)  # E = 0.2, phi = 1/6
    assert ctrl.decide().mode is StressMode.SINGLE
    ctrl.observe(1.0)  # phi = 0.5
    decision = ctrl.decide()
    assert decision.mode is StressMode.MULTI and decision.lr == ctrl.config.lr_multi and not decision.snapshot
    ctrl.observe(5.0)  # phi = 5/6
    decision = ctrl.decide()
    assert decision.mode is StressMode.MIRROR and decision.snapshot
    assert decision.phi == pytest.approx(5 / 6)


def test_stress_ema_and_state_round_trip():
    ctrl = StressController(StressConfig(ema_beta=0.5))
    ctrl.observe(1.0)
    ctrl.observe(3.0)
    assert ctrl.ema == pytest.approx(2.0)
    assert ctrl.phi == pytest.approx(2 / 3)
    clone = StressController(StressConfig(ema_beta=0.5))
    clone.load_state_dict(ctrl.state_dict())
    assert clone.phi == ctrl.phi and clone.steps == 2
    with pytest.raises(TrainingError):
        ctrl.observe(float("nan"))
    with pytest.raises(ValueError, match="theta"):
        StressConfig(theta_single=0.8, theta_mirror=0.5)


def test_update_trains_shared_expert_in_single_mode(tiny):
    trainer = _trainer(tiny)
    trainer.stress = StressController(StressConfig(loss_scale=1000.0))  # every loss looks easy
    result = trainer.update(EXAMPLES, target_expert=3, steps=2)
    assert result.mode == "single" and result.expert == trainer.bank.config.shared_expert
    assert len(result.steps) == 2 and not result.stress_rolled_back


def test_mirror_mode_rolls_back_an_update_that_hurts_the_guard(tiny):
    from adapters.snapshot import BankSnapshot

    trainer = _trainer(tiny)
    # expert 2 first learns the guard texts; a reckless update on other texts then makes it forget
    guard = [TrainingExample("Q: 7 - 2?\nA:", " 5"), TrainingExample("Q: 9 / 3?\nA:", " 3")]
    optimizer = trainer.new_optimizer(lr=5e-2)
    for _ in range(15):
        trainer.step(guard, target_expert=2, optimizer=optimizer)
    trainer.stress = StressController(StressConfig(loss_scale=1e-3, lr_mirror=1.0))  # every loss is stressful
    before = BankSnapshot.capture(trainer.bank, trainer.router)
    result = trainer.update(EXAMPLES, target_expert=2, guard=guard, steps=3)
    assert result.mode == "mirror"
    assert result.guard_after > result.guard_before, result
    assert result.stress_rolled_back
    now = BankSnapshot.capture(trainer.bank, trainer.router)
    assert all(torch.equal(before.bank[k], v) for k, v in now.bank.items())
    assert all(torch.equal(before.router[k], v) for k, v in now.router.items())


def test_mirror_mode_keeps_an_update_that_helps(tiny):
    trainer = _trainer(tiny)
    trainer.stress = StressController(StressConfig(loss_scale=1e-3, lr_mirror=1e-2))
    result = trainer.update(EXAMPLES, target_expert=2, steps=3)  # guard = the examples themselves
    assert result.mode == "mirror" and not result.stress_rolled_back
    assert result.loss_after < result.loss_before


def _bank_state(trainer):
    return {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in trainer.bank.layers.items()}


def test_update_trains_the_target_expert_as_a_dense_optimizer_would(tiny):
    """An update optimizes the target expert alone (bank.training_one); the result is what an
    optimizer over the whole bank gives, where the other experts get zero gradients."""


    stress = StressConfig(loss_scale=1.0, theta_single=0.01, theta_mirror=0.99)  # always Multi mode
    alone = _trainer(tiny)
    alone.stress = StressController(stress)
    result = alone.update(EXAMPLES, target_expert=2, steps=3)
    assert result.mode == "multi" and result.expert == 2

    from agents.lm.models import load_model

    dense = _trainer(load_model("tiny-random"))
    optimizer = dense.new_optimizer(result.lr)  # every parameter of the bank and router
    features = dense.prompt_features(EXAMPLES)
    for _ in range(3):
        dense.step(EXAMPLES, 2, optimizer, features=features)
    for (name, (a, b)), (_, (da, db)) in zip(_bank_state(alone).items(), _bank_state(dense).items()):
        torch.testing.assert_close(a, da, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(b, db, rtol=1e-5, atol=1e-7, msg=name)
    assert result.loss_after < result.loss_before


def test_update_with_weight_decay_leaves_the_other_experts_alone(tiny):
    trainer = _trainer(tiny, weight_decay=0.5)
    trainer.stress = StressController(StressConfig(loss_scale=1.0, theta_single=0.01, theta_mirror=0.99))
    before = _bank_state(trainer)
    trainer.update(EXAMPLES, target_expert=1, steps=2)
    for name, (a, b) in _bank_state(trainer).items():
        for other in (0, 2, 3):
            assert torch.equal(a[other], before[name][0][other]), (name, other)  # no decay of untrained experts
        assert not torch.equal(b[1], before[name][1][1]), name


def test_a_refused_step_inside_an_update_keeps_the_earlier_steps_in_the_bank(tiny):
    trainer = _trainer(tiny)
    trainer.stress = StressController(StressConfig(loss_scale=1.0, theta_single=0.01, theta_mirror=0.99))
    before = _bank_state(trainer)
    calls = {"n": 0}

    def poison_third_step(module, inputs, out):
        calls["n"] += 1
        # update(): the prompt features (1 pass), the loss before (1), then 1 pass per step (micro_batch 2)
        return out * float("nan") if calls["n"] == 5 else out

    hook = tiny.model.get_input_embeddings().register_forward_hook(poison_third_step)
    try:
        with pytest.raises(TrainingError, match="non-finite"):
            trainer.update(EXAMPLES, target_expert=3, steps=3)
    finally:
        hook.remove()
    moved = _bank_state(trainer)
    assert any(not torch.equal(moved[n][1][3], before[n][1][3]) for n in moved)  # two steps written back
    assert all(layer._trained is None for layer in trainer.bank.layers.values())
    trainer.update(EXAMPLES, target_expert=3, steps=1)  # the bank is usable again


REPLAY = [TrainingExample("Q: 2 + 2?\nA:", " 2 + 2 = 4. The answer is 4"),
          TrainingExample("Q: 10 - 3?\nA:", " 10 - 3 = 7. The answer is 7")]


def test_update_trains_on_the_replay_of_the_expert_it_trains(tiny):
    trainer = _trainer(tiny)
    trainer.stress = StressController(StressConfig(loss_scale=1e6))  # Single mode: the shared expert trains
    shared = trainer.bank.config.shared_expert
    result = trainer.update(EXAMPLES, target_expert=2, steps=1, replay={2: REPLAY[:1], shared: REPLAY})
    assert result.expert == shared and result.replayed == 2
    alone = trainer.tokenize(EXAMPLES + REPLAY)
    assert result.steps[0]["tokens"] == int(alone.attention_mask.sum())  # the step trained the replay too


def test_mirror_mode_guards_the_replay_too(tiny):
    trainer = _trainer(tiny)
    trainer.stress = StressController(StressConfig(loss_scale=1e-3, lr_mirror=1e-2))  # Mirror mode
    with_replay = trainer.update(EXAMPLES, target_expert=1, steps=1, replay={1: REPLAY})
    assert with_replay.mode == "mirror" and with_replay.guard_before != with_replay.loss_before
    plain = trainer.update(EXAMPLES, target_expert=1, steps=1)
    assert plain.guard_before == plain.loss_before


def test_an_update_without_examples_is_refused(tiny):
    trainer = _trainer(tiny)
    with pytest.raises(TrainingError, match="at least one example"):
        trainer.update([], target_expert=0)


def test_per_example_memory_gives_each_row_its_own_features(tiny):
    # A pooled update trains texts of several problems: each row is routed with its own memory.
    trainer = _trainer(tiny, micro_batch=1)
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (examples, memory_dim)
    together = trainer._losses(trainer.tokenize(EXAMPLES), 2, rows)["router"]
    alone = [trainer._losses(trainer.tokenize([e]), 2, m)["router"] for e, m in zip(EXAMPLES, rows)]
    assert float(together) == pytest.approx(float(sum(alone)) / 2, rel=1e-5)
    seen, real = [], trainer._losses

    def spy(batch, target_expert, memory, features=None):
        seen.append(None if memory is None else memory.clone())
        return real(batch, target_expert, memory, features)

    trainer._losses = spy
    trainer.stress = StressController(StressConfig(loss_scale=1e6))  # Single mode: the shared expert's replay
    trainer.update(EXAMPLES, target_expert=2, steps=1, memory=rows, replay={trainer.bank.config.shared_expert: REPLAY})
    # micro-batches of one text each: the loss before (the examples), the step (the examples, then
    # the replay), the loss after (the examples)
    n = len(EXAMPLES)
    assert len(seen) == 3 * n + len(REPLAY) and all(m.shape[0] == 1 for m in seen)
    assert all(torch.equal(a, b) for a, b in zip(seen[:n] + seen[-n:], [*rows[:, None], *rows[:, None]]))
    stepped = seen[n:-n]
    assert torch.equal(stepped[0], rows[:1]) and torch.equal(stepped[1], rows[1:])
    assert all(torch.equal(m, rows[:1]) for m in stepped[2:])  # replayed texts take the first example's row


@pytest.mark.parametrize("shared_memory", [False, True])
@pytest.mark.parametrize("mirror", [False, True])
def test_replayed_texts_take_their_own_memory_rows_when_given(tiny, shared_memory, mirror):
    # A replayed text was learned on another problem: it is routed with that problem's features, in
    # the steps and, in Mirror mode, in the guard loss that decides a rollback.
    trainer = _trainer(tiny, micro_batch=1)
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (examples, memory_dim)
    memory = rows[0] if shared_memory else rows  # one vector for every example, or one row each
    replay_rows = torch.arange(len(REPLAY) * 3, dtype=torch.float32).reshape(len(REPLAY), 3)
    seen, real = [], trainer._losses

    def spy(batch, target_expert, memory, features=None):
        seen.append(memory.clone().reshape(1, -1))
        return real(batch, target_expert, memory, features)

    trainer._losses = spy
    # Single mode trains the shared expert; Mirror mode the target, guarding it and its replay
    trainer.stress = StressController(StressConfig(loss_scale=1e-6 if mirror else 1e6))
    expert = 2 if mirror else trainer.bank.config.shared_expert
    result = trainer.update(EXAMPLES, target_expert=2, steps=1, memory=memory, replay={expert: REPLAY},
                            replay_memory={expert: replay_rows})
    assert result.mode == ("mirror" if mirror else "single") and result.replayed == len(REPLAY)
    n, r = len(EXAMPLES), len(REPLAY)
    own = rows if not shared_memory else rows[:1].expand(n, -1)
    passes = [torch.cat(seen[n + i * (n + r):n + (i + 1) * (n + r)]) for i in range(2 if mirror else 1)]
    for trained in passes:  # the step (after the guard's loss before, in Mirror mode)
        assert torch.equal(trained, torch.cat([own, replay_rows]))
    stress, seen_before = trainer.stress.state_dict(), len(seen)
    with pytest.raises(ValueError, match="replay_memory has 1 rows for 2 replayed texts"):
        trainer.update(EXAMPLES, target_expert=2, steps=1, memory=memory, replay={expert: REPLAY},
                       replay_memory={expert: replay_rows[:1]})
    assert trainer.stress.state_dict() == stress and len(seen) == seen_before  # refused before anything ran
