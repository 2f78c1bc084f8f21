"""The maths of inversion, SDD and ESD, pinned on a tiny random Stable Diffusion pipeline."""

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from hfi_core.config import ConfigError, DistillConfig, InvertConfig
from hfi_core.distill.common import (
    EMA,
    Rollouts,
    Weights,
    ddim_scheduler,
    encode_prompts,
    erasure_loss,
    prepare,
    preservation_loss,
    run_trajectory,
    sample_step_index,
    select_trainable,
    start_from,
    trajectory_states,
)
from hfi_core.distill.esd import esd_target, train_esd
from hfi_core.distill.sdd import sdd_loss, sdd_target, train_sdd
from hfi_core.inversion import (
    TOKENS_FILE,
    invert,
    load_tokens,
    mode_token,
    reward_weights,
    save_token,
    spell,
    token_file,
)
from hfi_core.toyworld.models import make_sampling_scheduler, make_text_encoder, make_unet, make_vae
from hfi_core.toyworld.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def base_pipe(tmp_path_factory):
    torch.manual_seed(0)
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    pipe = StableDiffusionPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(tok), tokenizer=tok, unet=make_unet((16, 32, 32)),
        scheduler=make_sampling_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(base_pipe):
    return copy.deepcopy(base_pipe)


def test_sdd_loss_is_zero_when_conditional_and_unconditional_agree_and_positive_otherwise(pipe):
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([500, 20])
    uncond = encode_prompts(pipe, ["", ""])
    assert sdd_loss(pipe.unet, x, t, uncond.clone(), uncond).item() == 0.0
    cond = encode_prompts(pipe, ["a red circle in the style of van stripe"] * 2)
    assert sdd_loss(pipe.unet, x, t, cond, uncond).item() > 0.0


def test_sdd_loss_sends_no_gradient_through_its_target(pipe):
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    cond, uncond = encode_prompts(pipe, ["a blue square"]), encode_prompts(pipe, [""])
    sdd_loss(pipe.unet, x, t, cond, uncond).backward()
    manual = torch.nn.functional.mse_loss(pipe.unet(x, t, cond).sample, pipe.unet(x, t, uncond).sample.detach())
    grads = [p.grad.clone() for p in pipe.unet.parameters() if p.grad is not None]
    pipe.unet.zero_grad()
    manual.backward()
    assert all(
        torch.allclose(a, p.grad)
        for a, p in zip(grads, [p for p in pipe.unet.parameters() if p.grad is not None], strict=True)
    )


def test_preservation_loss_is_zero_for_the_original_and_pulls_a_changed_model_back(pipe):
    trained = select_trainable(pipe.unet, "attn2_kv")
    anchor = Weights(pipe.unet, [n for n, _ in trained])  # the original values of what trains
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([400, 100])
    cond = encode_prompts(pipe, ["a red circle with polka dots"] * 2)
    assert preservation_loss(pipe.unet, anchor, x, t, cond).item() == 0.0
    with torch.no_grad():
        for _, p in trained:
            p.add_(0.05 * torch.randn_like(p))
    loss = preservation_loss(pipe.unet, anchor, x, t, cond)
    assert loss.item() > 0.0
    loss.backward()
    opt = torch.optim.SGD([p for _, p in trained], lr=0.5)
    opt.step()  # one step down the anchor's gradient moves the model back towards the original
    assert preservation_loss(pipe.unet, anchor, x, t, cond).item() < loss.item()
    assert all(v.grad is None for v in anchor.values)


def test_preserve_prompts_keep_training_resumable_bit_for_bit(base_pipe, tmp_path):
    cfg = DistillConfig(steps=4, lr=1e-3, sampler_steps=6, checkpoint_every=2, preserve_prompts=["a with polka dots"])
    prompts = ["a red circle in the style of van stripe"]
    straight, _, _ = train_sdd(copy.deepcopy(base_pipe), cfg, prompts, tmp_path / "a", show_progress=False)
    short = DistillConfig(**{**vars(cfg), "steps": 2})
    train_sdd(copy.deepcopy(base_pipe), short, prompts, tmp_path / "b", show_progress=False)
    resumed, _, _ = train_sdd(copy.deepcopy(base_pipe), cfg, prompts, tmp_path / "b", resume=True, show_progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_ema_update_moves_the_teacher_a_fraction_of_the_way_and_only_on_trained_parameters(pipe):
    names = [n for n, _ in select_trainable(pipe.unet, "attn2")]
    ema = EMA(pipe.unet, names, decay=0.9)
    before = ema.state()
    assert sorted(before) == sorted(names)  # only what trains is kept: the rest is the student's
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(1.0)  # the student moves everywhere
    ema.update()
    after, student = ema.state(), dict(pipe.unet.named_parameters())
    for n in before:
        expected = 0.9 * before[n] + 0.1 * student[n] if n in names else before[n]
        assert torch.allclose(after[n], expected, atol=1e-6), n


def test_attn2_selection_trains_cross_attention_only():
    unet = make_unet((16, 32, 32))
    chosen = select_trainable(unet, "attn2")
    assert chosen and all(".attn2." in n for n, _ in chosen)
    assert all(p.requires_grad == (".attn2." in n) for n, p in unet.named_parameters())
    with pytest.raises(ValueError, match="selects no parameter"):
        select_trainable(torch.nn.Linear(2, 2), "attn2")


def test_beta_positions_cover_the_trajectory_and_concentrate_in_the_middle():
    rng = np.random.default_rng(0)
    uniform = [sample_step_index(50, rng, 1.0, 1.0) for _ in range(20_000)]
    beta = np.array([sample_step_index(50, rng, 3.0, 3.0) for _ in range(20_000)])
    assert set(uniform) == set(range(50))  # every position of the trajectory, none outside
    assert beta.min() >= 0 and beta.max() <= 49 and beta.min() <= 3 and beta.max() >= 46
    assert abs(beta.mean() - 24.5) < 0.5 and ((beta >= 12) & (beta <= 37)).mean() > 0.8


def test_a_trajectory_state_is_always_labelled_with_its_own_noise_level(pipe):
    sched = ddim_scheduler(pipe, 10)
    cond = encode_prompts(pipe, ["a red circle"])
    uncond = encode_prompts(pipe, [""])
    labels = []
    for k in range(10):
        x, t = run_trajectory(pipe.unet, sched, cond, uncond, k, 3.0, (1, 4, 16, 16), torch.Generator().manual_seed(0))
        labels.append(int(t[0]))
        if k == 0:  # no step run: pure noise, labelled with the first (latest) timestep
            assert torch.equal(x, torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0)))
    assert labels == [int(s) for s in sched.timesteps]  # strictly decreasing, never a late label on a late state
    assert labels[0] > 900 and labels[-1] < 100


class CountingUNet(torch.nn.Module):
    """The UNet, counting its forward passes."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, 0

    def forward(self, *args):
        self.calls += 1
        return self.unet(*args)


def test_one_rollout_gives_each_position_the_state_its_own_partial_trajectory_would(pipe):
    sched = ddim_scheduler(pipe, 8)
    cond, uncond = encode_prompts(pipe, ["a red circle"]), encode_prompts(pipe, [""])
    counting = CountingUNet(pipe.unet)
    states = trajectory_states(
        counting, sched, cond, uncond, [5, 2, 0, 5], 3.0, (1, 4, 16, 16), torch.Generator().manual_seed(3)
    )
    assert counting.calls == 5  # run once, to the furthest position
    for (x, t), k in zip(states, [5, 2, 0, 5], strict=True):
        alone = run_trajectory(pipe.unet, sched, cond, uncond, k, 3.0, (1, 4, 16, 16), torch.Generator().manual_seed(3))
        assert torch.equal(x, alone[0]) and torch.equal(t, alone[1])


@pytest.mark.parametrize("reuse", [1, 3])
def test_rollouts_serve_reuse_steps_each_with_one_prompt_per_rollout(pipe, reuse):
    cfg = DistillConfig(steps=6, sampler_steps=8, batch_size=2, rollout_reuse=reuse, checkpoint_every=0)
    prompts = ["a red circle", "a blue square"]
    s = prepare(copy.deepcopy(pipe), cfg, prompts)
    rng = np.random.default_rng(cfg.seed)  # the positions the rollouts must draw, in order
    positions = [sample_step_index(8, rng) for _ in range(6)]
    counting, rollouts = CountingUNet(pipe.unet), Rollouts(s, cfg)
    for step in range(6):
        before = counting.calls
        cond, x, t = rollouts.state(counting, step)
        assert torch.equal(cond, s.cond_all[(step // reuse) % 2].expand(2, -1, -1))  # prompts cycle per rollout
        assert x.shape == (2, 4, 16, 16) and int(t[0]) == int(s.sched.timesteps[positions[step]])
        group = positions[step - step % reuse : step - step % reuse + reuse]
        assert counting.calls - before == (max(group) if step % reuse == 0 else 0)  # one rollout per group


def test_checkpoints_must_fall_on_rollout_boundaries():
    with pytest.raises(ConfigError, match="checkpoint_every: 100 must be a multiple of rollout_reuse"):
        DistillConfig(rollout_reuse=3)
    with pytest.raises(ConfigError, match="rollout_reuse: must be >= 1, got 0"):
        DistillConfig(rollout_reuse=0, checkpoint_every=0)
    assert DistillConfig(rollout_reuse=4, checkpoint_every=200).rollout_reuse == 4


def test_a_warm_start_moves_the_trained_parameters_and_keeps_the_base_as_the_reference(pipe):
    cfg = DistillConfig(steps=2, trainable="attn2_kv", sampler_steps=4, checkpoint_every=0)
    s = prepare(pipe, cfg, ["a red circle in the style of van stripe"])
    base = [v.clone() for v in s.original.values]
    champion = {n: p.detach() + 0.5 for n, p in zip(s.names, s.original.params, strict=True)}
    start_from(pipe.unet, s.names, champion, "champion/delta.safetensors")
    params = dict(pipe.unet.named_parameters())
    assert all(torch.equal(params[n], champion[n]) for n in s.names)
    assert all(torch.equal(v, b) for v, b in zip(s.original.values, base, strict=True))  # still the base
    extra = {**champion, "down_blocks.0.attn2.to_q.weight": 0}  # another trainable setting's parameter
    with pytest.raises(ValueError, match=r"champion/delta.safetensors: its parameters differ .*to_q"):
        start_from(pipe.unet, s.names, extra, "champion/delta.safetensors")
    with pytest.raises(ConfigError, match="warm_start: uce .* cannot continue from a champion"):
        DistillConfig(method="uce", warm_start=True)
    with pytest.raises(ConfigError, match="warm_start: sdd with trainable lora"):
        DistillConfig(trainable="lora", warm_start=True)


def test_esd_target_is_negatively_guided_and_reduces_to_unconditional_at_eta_zero(pipe):
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([400, 400])
    cond, uncond = encode_prompts(pipe, ["a green triangle"] * 2), encode_prompts(pipe, ["", ""])
    with torch.no_grad():
        e_u, e_c = pipe.unet(x, t, uncond).sample, pipe.unet(x, t, cond).sample
    none = Weights(pipe.unet, [])
    assert torch.allclose(esd_target(pipe.unet, none, x, t, cond, uncond, 1.0), 2 * e_u - e_c, atol=1e-5)
    assert torch.allclose(esd_target(pipe.unet, none, x, t, cond, uncond, 0.0), e_u, atol=1e-5)


def test_reward_weights_train_the_images_above_the_mean_reward_and_average_one():
    w = reward_weights(np.array([-1.0, 0.5, 1.0, 2.5]))  # mean 0.75
    assert (w > 0).tolist() == [False, False, True, True] and w[w > 0].mean() == pytest.approx(1.0)
    assert w[3] / w[2] == pytest.approx((2.5 - 0.75) / (1.0 - 0.75))  # in proportion to the excess
    top = reward_weights(np.array([0.1, 0.9, 0.5, 0.7]), top_k=1)
    assert (top > 0).tolist() == [False, True, False, False] and top[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="all 2 images have the same reward"):
        reward_weights(np.array([0.3, 0.3]))


def test_reward_weights_ignore_the_bradley_terry_constant_and_the_reward_scale():
    # A Bradley-Terry reward is r + c for any c: the choice of images must not depend on c. Before
    # standardising, r - 5 left no positive reward and r + 5 made every image train.
    r = np.random.default_rng(0).normal(size=50)
    w = reward_weights(r)
    for shifted in (r - 5.0, r + 5.0, 3.0 * r + 1.0):
        assert np.allclose(reward_weights(shifted), w)
    assert 0 < (w > 0).sum() < len(r)


def test_inversion_changes_exactly_one_embedding_row_and_loads_in_diffusers(pipe, base_pipe, tmp_path):
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    latents = torch.randn(6, 4, 16, 16)
    cfg = InvertConfig(token="<hfi-striped>", templates=["a {}"], steps=3, batch_size=2, lr=1e-2)
    v, losses = invert(pipe, latents, reward_weights(np.arange(6.0)), cfg, "stripe", show_progress=False)
    after = pipe.text_encoder.get_input_embeddings().weight
    token_id = pipe.tokenizer.convert_tokens_to_ids("<hfi-striped>")
    assert after.shape[0] == before.shape[0] + 1 and token_id == before.shape[0]
    assert torch.equal(after[:token_id], before)  # bit-identical
    init = before[pipe.tokenizer.convert_tokens_to_ids("stripe</w>")]
    assert v.shape == (1, before.shape[1]) and len(losses) == 3
    assert not torch.equal(after[token_id], init) and torch.equal(after[token_id], v[0])
    save_token(tmp_path, "<hfi-striped>", v)
    fresh = copy.deepcopy(base_pipe)
    fresh.load_textual_inversion(str(tmp_path))
    loaded = fresh.text_encoder.get_input_embeddings().weight
    assert torch.equal(loaded[fresh.tokenizer.convert_tokens_to_ids("<hfi-striped>")], v[0])


def test_a_multi_vector_token_trains_its_rows_only_and_conditions_through_every_vector(pipe, base_pipe, tmp_path):
    from hfi_core.distill.common import prompt_ids

    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    cfg = InvertConfig(token="<hfi-striped>", templates=["a {}"], steps=3, batch_size=2, lr=1e-2, vectors=3)
    v, _ = invert(pipe, torch.randn(4, 4, 16, 16), np.ones(4), cfg, "stripe", show_progress=False)
    after = pipe.text_encoder.get_input_embeddings().weight
    assert v.shape == (3, before.shape[1]) and after.shape[0] == before.shape[0] + 3
    assert torch.equal(after[: before.shape[0]], before) and torch.equal(after[before.shape[0] :], v)
    assert spell("<hfi-striped>", 3) == "<hfi-striped> <hfi-striped>_1 <hfi-striped>_2"
    save_token(tmp_path, "<hfi-striped>", v)
    fresh = copy.deepcopy(base_pipe)
    fresh.load_textual_inversion(str(tmp_path))  # diffusers' own loader: three rows, one placeholder
    ids = prompt_ids(fresh, ["a <hfi-striped>"])[0]
    new = fresh.tokenizer.convert_tokens_to_ids(["<hfi-striped>", "<hfi-striped>_1", "<hfi-striped>_2"])
    assert all(i in ids.tolist() for i in new)  # spelled out as the pipeline's own call does
    table = fresh.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[new], v)


def test_one_token_per_look_loads_from_tokens_json_in_look_order(pipe, base_pipe, tmp_path):
    assert [mode_token("<hfi-x>", k) for k in range(3)] == ["<hfi-x>", "<hfi-x-2>", "<hfi-x-3>"]
    cfg = InvertConfig(token="<hfi-x>", templates=["a {}"], steps=2, batch_size=2, lr=1e-2, vectors=2)
    listed = []
    for k in range(3):
        v, _ = invert(pipe, torch.randn(4, 4, 16, 16), np.ones(4), cfg, "stripe", token=mode_token("<hfi-x>", k),
                      show_progress=False)  # fmt: skip
        save_token(tmp_path, mode_token("<hfi-x>", k), v, token_file(k))
        listed.append({"token": mode_token("<hfi-x>", k), "file": token_file(k)})
    (tmp_path / TOKENS_FILE).write_text(__import__("json").dumps({"tokens": listed}))
    fresh = copy.deepcopy(base_pipe)
    assert load_tokens(fresh, tmp_path) == ["<hfi-x>", "<hfi-x-2>", "<hfi-x-3>"]
    assert "<hfi-x-3>_1" in fresh.tokenizer.get_vocab()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / TOKENS_FILE).write_text('{"tokens": [{"token": "<t>", "file": "../learned_embeds.safetensors"}]}')
    with pytest.raises(ValueError, match="not a plain file name"):
        load_tokens(copy.deepcopy(base_pipe), bad)


def test_inversion_norm_cap_keeps_v_within_the_largest_word_norm_and_only_when_asked(pipe, base_pipe):
    words = base_pipe.text_encoder.get_input_embeddings().weight.detach().norm(dim=1).max().item()
    latents = torch.randn(6, 4, 16, 16)
    cfg = InvertConfig(token="<hfi-striped>", templates=["a {}"], steps=5, batch_size=2, lr=0.5)
    free, _ = invert(copy.deepcopy(base_pipe), latents, np.ones(6), cfg, "stripe", show_progress=False)
    assert free.norm().item() > 1.5 * words  # a large lr grows an unconstrained v* past every word
    capped, _ = invert(
        pipe, latents, np.ones(6), cfg.model_copy(update={"max_norm": 1.5}), "stripe", show_progress=False
    )
    assert capped.norm().item() == pytest.approx(1.5 * words, rel=1e-4)


@pytest.mark.parametrize(
    ("train", "reuse"), [(train_sdd, 1), (train_esd, 1), (train_sdd, 2)], ids=["sdd", "esd", "sdd-rollout-reuse"]
)
def test_training_killed_at_step_k_and_resumed_ends_with_the_same_weights(base_pipe, tmp_path, train, reuse):
    cfg = DistillConfig(steps=4, lr=1e-3, sampler_steps=6, checkpoint_every=2, rollout_reuse=reuse)
    prompts = ["a red circle in the style of van stripe", "a blue square with a zebra pattern"]
    straight, names, _ = train(copy.deepcopy(base_pipe), cfg, prompts, tmp_path / "a", show_progress=False)
    cfg_killed = cfg.model_copy(update={"steps": 2})  # stops after step 2's checkpoint
    train(copy.deepcopy(base_pipe), cfg_killed, prompts, tmp_path / "b", show_progress=False)
    resumed, _, losses = train(copy.deepcopy(base_pipe), cfg, prompts, tmp_path / "b", resume=True, show_progress=False)
    assert len(losses) == 2  # only steps 3 and 4 ran again
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], base_pipe.unet.state_dict()[n]) for n in names)  # it did train


def test_lora_trains_only_adapter_matrices_and_merges_into_a_plain_unet_with_the_same_output(base_pipe, tmp_path):
    from hfi_core.distill.common import merge_lora

    pipe = copy.deepcopy(base_pipe)
    cfg = DistillConfig(steps=3, lr=1e-2, sampler_steps=4, trainable="lora", lora_rank=2, checkpoint_every=0)
    teacher, names, _ = train_sdd(pipe, cfg, ["a red circle in the style of van stripe"], tmp_path, show_progress=False)
    assert names and all("lora_" in n for n in names)
    plain, changed = merge_lora(teacher)
    assert not any("lora" in n for n in plain.state_dict()) and all(".attn2." in n for n in changed)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([300]), encode_prompts(pipe, ["a blue square"])
    with torch.no_grad():
        assert torch.allclose(plain(x, t, c).sample, teacher(x, t, c).sample, atol=1e-5)
        assert not torch.allclose(plain(x, t, c).sample, base_pipe.unet(x, t, c).sample, atol=1e-5)


def _full_copy_loop(pipe, cfg, prompts, method):
    """The loops as written before the teacher and the original kept only what trains: full
    copies of the UNet, one per role. The swapped-in values must reproduce them bit for bit."""
    s = prepare(pipe, cfg, prompts)
    unet, names = pipe.unet, s.names
    teacher = copy.deepcopy(unet).eval().requires_grad_(False)
    original = copy.deepcopy(unet).eval().requires_grad_(False)
    t_params, u_params = dict(teacher.named_parameters()), dict(unet.named_parameters())
    rollouts = Rollouts(s, cfg)
    for step in range(cfg.steps):
        cond, x, t = rollouts.state(teacher if method == "sdd" else unet, step)
        with torch.no_grad():
            if method == "sdd":
                target = unet(x, t, s.uncond).sample
            else:
                e_u, e_c = original(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s.uncond, cond])).sample.chunk(2)
                target = e_u - cfg.esd_eta * (e_c - e_u)
        c_p = s.preserve[step % len(s.preserve)].expand(x.shape[0], -1, -1)
        with torch.no_grad():
            anchor = original(x, t, c_p).sample
        # The concept and the preserve prompt's predictions in one forward, as the loops fold them.
        pred, pred_p = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, c_p])).sample.chunk(2)
        mse = torch.nn.functional.mse_loss
        loss = mse(pred, target) + cfg.preserve_weight * mse(pred_p, anchor)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.params, cfg.grad_clip)
        s.opt.step()
        with torch.no_grad():
            for n in names:
                t_params[n].lerp_(u_params[n], 1.0 - cfg.ema_decay)
    return (teacher if method == "sdd" else unet).state_dict()


@pytest.mark.parametrize("method", ["sdd", "esd"])
def test_swapped_teacher_and_original_train_exactly_as_full_copies_did(base_pipe, tmp_path, method):
    cfg = DistillConfig(method=method, steps=4, lr=1e-3, sampler_steps=6, batch_size=2, ema_decay=0.5,
                        checkpoint_every=0, preserve_prompts=["a with polka dots"])  # fmt: skip
    prompts = ["a red circle in the style of van stripe"]
    expected = _full_copy_loop(copy.deepcopy(base_pipe), cfg, prompts, method)
    train = train_sdd if method == "sdd" else train_esd
    got, names, _ = train(copy.deepcopy(base_pipe), cfg, prompts, tmp_path, show_progress=False)
    got = got.state_dict()
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert any(not torch.equal(got[n], base_pipe.unet.state_dict()[n]) for n in names)  # it did train


def test_weights_swap_in_for_a_block_and_back(pipe):
    names = [n for n, _ in select_trainable(pipe.unet, "attn2_kv")]
    other = Weights(pipe.unet, names)
    with torch.no_grad():
        for v in other.values:
            v.add_(1.0)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([300]), encode_prompts(pipe, ["a blue square"])
    with torch.no_grad():
        own = pipe.unet(x, t, c).sample
        with other.applied():
            swapped = pipe.unet(x, t, c).sample
            assert not dict(pipe.unet.named_parameters())[names[0]].detach().equal(other.values[0])  # swapped out
        assert pipe.unet(x, t, c).sample.equal(own) and not swapped.equal(own)
    assert sum(v.numel() for v in other.values) < 0.2 * sum(p.numel() for p in pipe.unet.parameters())


def test_folded_erasure_loss_is_the_two_terms(pipe):
    """The folded forward (concept and preserve prompt in one batch) computes the same loss and
    gradient as the erasure term plus the preserve term run apart."""
    cfg = DistillConfig(method="sdd", steps=1, batch_size=2, preserve_prompts=["a red circle"], preserve_weight=0.7)
    s = prepare(pipe, cfg, ["a blue square"])
    unet = pipe.unet
    x, t = torch.randn(s.latent_shape), torch.tensor([400, 400])
    cond = s.cond_all[0].expand(2, -1, -1)
    target = sdd_target(unet, x, t, s.uncond)
    with torch.no_grad():  # move the student away from the original, so the preserve term is not 0
        for p in s.params:
            p.add_(0.01 * torch.randn_like(p))
    folded = erasure_loss(s, unet, x, t, cond, target, 0, cfg.preserve_weight)
    g_folded = torch.autograd.grad(folded, s.params)
    apart = torch.nn.functional.mse_loss(unet(x, t, cond).sample, target)
    apart = apart + cfg.preserve_weight * preservation_loss(unet, s.original, x, t, s.preserve[0].expand(2, -1, -1))
    g_apart = torch.autograd.grad(apart, s.params)
    assert folded.item() > 0 and torch.allclose(folded, apart, rtol=1e-5, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_folded, g_apart, strict=True))


def test_inversion_starts_from_the_given_token_and_refuses_another_shape(pipe):
    latents = torch.randn(4, 4, 16, 16)
    cfg = InvertConfig(token="<warm>", vectors=2, steps=3, batch_size=2, lr=1e-12)
    start = torch.randn(2, pipe.text_encoder.get_input_embeddings().weight.shape[1])
    v, losses = invert(pipe, latents, np.ones(4), cfg, "stripe", init=start, steps=1, show_progress=False)
    assert len(losses) == 1 and torch.allclose(v, start, atol=1e-6)  # one step at lr ~0: still the start
    with pytest.raises(ValueError, match="invert.vectors"):
        invert(pipe, latents, np.ones(4), cfg.model_copy(update={"token": "<other>"}), "stripe",
               init=torch.randn(3, start.shape[1]), show_progress=False)  # fmt: skip
