"""The contracts the package is built on: the one training loop (schedule, resume checks, weight decay, objective
hooks), the Dictionary and Edit protocols, atomic folders, codebook dead-code replacement, and the zoo's loader."""

import dataclasses
import json
import math
import warnings

import pytest
import torch
from torch import nn

from conftest import VOCAB, tiny_hf, word_tokenizer
from nbfeatures import _io, sites, zoo
from nbfeatures.codebook import (BlockCodes, CodebookConfig, CodebookLayer, CodebookModel, CodebookObjective, CodebookTrainConfig,
                                 ForceCodes, PatchCodes)
from nbfeatures.edits import Ablate, Edit, Splice, Steer
from nbfeatures.harvest import TokenSource
from nbfeatures.sae import (BatchTopKConfig, BatchTopKObjective, BatchTopKSAE, BinaryAE, BinaryConfig, BinaryObjective, Dictionary,
                            JumpReLUConfig, JumpReLUObjective, JumpReLUSAE, MatryoshkaConfig, MatryoshkaObjective, MatryoshkaSAE,
                            ReLUConfig, ReLUObjective, ReLUSAE, TopKConfig, TopKObjective, TopKSAE, load_sae, save_sae)
from nbfeatures.sae.base import DictionaryModule
from nbfeatures.sae.io import ARCHITECTURES
from nbfeatures.train import TrainConfig, latest_checkpoint, lr_factor, train, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- the training loop


def test_linear_schedule_by_hand():
    cfg = TrainConfig(steps=10, warmup_steps=4, decay_fraction=0.5)  # warm-up 0..3, decay from step 5 to 0 at step 10
    assert [lr_factor(cfg, s) for s in range(10)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    assert lr_factor(cfg, 10) == 0  # the schedule's end
    assert [lr_factor(TrainConfig(steps=5), s) for s in range(5)] == [1.0] * 5  # no warm-up, no decay: constant


def test_cosine_schedule_by_hand():
    cfg = TrainConfig(steps=12, schedule="cosine", warmup_steps=2, min_lr_ratio=0.2)
    assert [lr_factor(cfg, s) for s in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert lr_factor(cfg, 4) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 2 / 10)))  # 2 of the 10 cosine steps
    assert lr_factor(cfg, 7) == pytest.approx(0.6)  # half way: 0.2 + 0.8 / 2
    assert lr_factor(cfg, 12) == pytest.approx(0.2)  # ends at min_lr_ratio, never below
    factors = [lr_factor(cfg, s) for s in range(2, 13)]
    assert all(a >= b for a, b in zip(factors, factors[1:])) and min(factors) >= 0.2 - 1e-12


class Probe:
    """Zero-gradient loss (grads are zeros, not None, so AdamW still visits every parameter); records the hooks' calls."""

    def __init__(self, module):
        self.module, self.after = module, []

    def __call__(self, batch):
        return sum((p * 0).sum() for p in self.module.parameters()) + 0 * batch.sum(), {"loss": 0.0}

    def before_step_(self, step):
        return {"probe": float(step)} if step == 2 else None

    def after_step_(self, step):
        self.after.append(step)


class Ones:
    def batch(self, step):
        return torch.ones(2, 3)


def test_weight_decay_shrinks_matrices_only_at_each_groups_lr():
    torch.manual_seed(0)
    module = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(4, 2)})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    probe = Probe(module)
    probe.param_groups = lambda lr: [{"params": list(module["a"].parameters()), "lr": lr},
                                     {"params": list(module["b"].parameters()), "lr": lr / 10}]
    cfg = TrainConfig(steps=5, batch_size=2, lr=0.1, weight_decay=0.5, log_every=100)
    hist = train(module, Ones(), cfg, probe, progress=False)
    after = module.state_dict()
    for name, lr in (("a", 0.1), ("b", 0.01)):  # AdamW: p *= 1 - lr * wd each step; Adam's own update is 0 / (0 + eps)
        torch.testing.assert_close(after[f"{name}.weight"], before[f"{name}.weight"] * (1 - lr * 0.5) ** 5, rtol=1e-6, atol=0)
        assert torch.equal(after[f"{name}.bias"], before[f"{name}.bias"])
    assert probe.after == [1, 2, 3, 4, 5]  # after_step_ gets the 1-based step
    assert list(hist["step"]) == [3, 5] and hist["probe"].iloc[0] == 2  # before_step_'s extra fields force a history row


def test_history_lr_follows_the_schedule():
    module = nn.Linear(3, 2)
    hist = train(module, Ones(), TrainConfig(steps=8, batch_size=2, lr=0.5, schedule="cosine", warmup_steps=3, log_every=1),
                 Probe(module), progress=False)
    cfg = TrainConfig(steps=8, schedule="cosine", warmup_steps=3)
    assert list(hist["lr"]) == pytest.approx([0.5 * lr_factor(cfg, s) for s in range(8)])


def test_resume_refuses_another_objective_or_training_config_and_allows_more_steps(tmp_path):
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    base = dict(steps=4, batch_size=64, lr=3e-3, checkpoint_dir=str(tmp_path))

    def run(objective=None, **changes):
        sae = TopKSAE(TopKConfig(16, 32, 4))
        return train_sae(sae, x, TrainConfig(**{**base, **changes}), objective=objective and objective(sae), progress=False)

    run()
    with pytest.raises(ValueError, match=r"its objective config is \{'aux_coef': 0.03125.*this run's is \{'aux_coef': 0.5"):
        run(objective=lambda sae: TopKObjective(sae, aux_coef=0.5))
    with pytest.raises(ValueError, match=r"its train config is \{.*'lr': 0.003.*this run's is \{.*'lr': 0.001"):
        run(lr=1e-3)
    with pytest.raises(ValueError, match=r"its train config is \{.*'seed': 0\}, this run's is \{.*'seed': 1\}"):
        run(seed=1)
    with pytest.raises(ValueError, match="its objective is TopKObjective, this run's is ReLUObjective"):
        run(objective=lambda sae: ReLUObjective(sae))
    assert latest_checkpoint(tmp_path).name == "step_00000004"  # refusals wrote nothing
    hist = run(steps=6, log_every=1, checkpoint_every=3)  # longer, logged and saved differently: resumes
    assert list(hist["step"]) == [4, 5, 6] and latest_checkpoint(tmp_path).name == "step_00000006"


# ----------------------------------------------------------------------------- the Dictionary and Edit protocols

CONFIGS = {"topk": dict(k=4), "batchtopk": dict(k=4), "matryoshka_batchtopk": dict(k=4)}  # k <= d_sae = 16, per architecture


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_registered_dictionary_obeys_the_contract_and_round_trips(arch, tmp_path):
    module_cls, config_cls = ARCHITECTURES[arch]
    sae = module_cls(config_cls(d_in=8, d_sae=16, **CONFIGS.get(arch, {})), seed=3)
    assert isinstance(sae, Dictionary) and sae.architecture == arch
    assert sae.config_dict() == dataclasses.asdict(sae.cfg)
    x = torch.randn(5, 8)
    with torch.no_grad():
        out = sae(x)
        torch.testing.assert_close(out[0], sae.decode(sae.encode(x)))  # first field is x_hat
    loaded = load_sae(save_sae(sae, tmp_path / arch))
    assert type(loaded) is module_cls and loaded.config_dict() == sae.config_dict()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sae.state_dict().items())


def test_the_shipped_dictionaries_and_their_default_objectives():
    pairs = [(TopKSAE(TopKConfig(8, 16, 4)), TopKObjective), (ReLUSAE(ReLUConfig(8, 16)), ReLUObjective),
             (BinaryAE(BinaryConfig(8, 16)), BinaryObjective), (BatchTopKSAE(BatchTopKConfig(8, 16, 4)), BatchTopKObjective),
             (JumpReLUSAE(JumpReLUConfig(8, 16)), JumpReLUObjective), (MatryoshkaSAE(MatryoshkaConfig(8, 16, 4)), MatryoshkaObjective)]
    assert {type(sae).architecture for sae, _ in pairs} == set(ARCHITECTURES)
    for sae, objective in pairs:
        assert isinstance(sae, Dictionary) and type(sae.default_objective()) is objective


def test_a_dictionary_without_default_objective_is_not_one():
    class Half(DictionaryModule):  # everything but default_objective
        architecture, cfg = "half", ReLUConfig(4, 4)
        encode = decode = forward = nn.Identity.forward

    assert not isinstance(Half(), Dictionary)
    with pytest.raises(ValueError, match="Half has no default objective; pass objective="):
        train_sae(Half(), torch.randn(64, 4), TrainConfig(steps=2, batch_size=8), progress=False)


@dataclasses.dataclass(frozen=True)
class Scale:
    """An edit of one's own: multiply the activation by `by` at `positions`."""

    site: str
    by: float
    positions: object = None

    def apply(self, act, mask):
        return torch.where(mask.view(1, -1, 1), act * self.by, act), {"norm": act.norm()}


def test_every_edit_is_an_edit_and_a_custom_one_runs_like_a_hook(arch, model, hf_model, ids):
    layer = CodebookLayer(CodebookConfig(32, 8))
    site = "blocks.0.hook_resid_post"
    edits = [Splice(site, nn.Identity()), Steer(site, torch.zeros(32)), Ablate(site), ForceCodes(site, layer, (1,)),
             PatchCodes(site, layer, torch.zeros(3, 1, dtype=torch.long)), BlockCodes(site, layer, (1,)), Scale(site, 2.0)]
    assert all(isinstance(e, Edit) for e in edits) and not isinstance(layer, Edit)
    out = sites.run(model, ids, [Scale(site, -3.0, positions=[1, -1])])
    block = {"gpt2": "transformer.h.0", "gpt_neox": "gpt_neox.layers.0", "llama": "model.layers.0"}[arch]

    def hook(module, args, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[:, [1, h.shape[1] - 1]] *= -3.0
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = hf_model.get_submodule(block).register_forward_hook(hook)
    try:
        expected = hf_model(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.logits, hf_model(ids).logits) and set(out.outputs[site]) == {"norm"}


# ----------------------------------------------------------------------------- atomic folders, codebook dead-code replacement


def test_atomic_folder_replaces_on_success_keeps_the_old_on_a_crash(tmp_path):
    folder = tmp_path / "out"
    with _io.atomic_folder(folder) as tmp:  # first write: no old folder
        (tmp / "a.txt").write_text("old")
        (tmp / "codebooks").mkdir()
        (tmp / "codebooks" / "c.txt").write_text("kept")
    with pytest.raises(RuntimeError, match="boom"):
        with _io.atomic_folder(folder) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (folder / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with _io.atomic_folder(folder, keep=("codebooks", "absent")) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt", "codebooks"]  # a.txt gone, codebooks/ moved over
    assert (folder / "codebooks" / "c.txt").read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with _io.atomic_folder(folder) as tmp:  # without keep, the subfolder goes with the old folder
        (tmp / "c.txt").write_text("")
    assert sorted(p.name for p in folder.iterdir()) == ["c.txt"]


@pytest.mark.parametrize("replace_after", [3, 0])
def test_codebook_objective_reseeds_dead_codes_every_replace_after_steps(replace_after, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sites.wrap(tiny_hf("gpt2"), word_tokenizer())
    cb = CodebookModel(model, {"blocks.0.hook_mlp_out": CodebookLayer(CodebookConfig(32, 40))})
    layer, calls = cb.layer("blocks.0.hook_mlp_out"), []
    real = layer.replace_dead_codes_
    layer.replace_dead_codes_ = lambda noise, seed: calls.append((noise, seed, real(noise, seed=seed)))
    obj = CodebookObjective(cb, CodebookTrainConfig(model_lr_factor=0.0, replace_after=replace_after, replace_noise=0.05))
    assert obj.config_dict() == dataclasses.asdict(obj.cfg)
    tokens = torch.randint(0, VOCAB - 1, (16, 8), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=7, batch_size=4, lr=1e-3, checkpoint_dir=str(tmp_path))
    train_sae(cb, TokenSource(tokens, 4), cfg, objective=obj, progress=False)
    if replace_after == 0:
        assert calls == []
        return
    assert [(noise, seed) for noise, seed, _ in calls] == [(0.05, 3), (0.05, 6)]
    assert all(n > 0 for _, _, n in calls)  # 40 codes, 32 tokens a step: some never fire
    with pytest.raises(ValueError, match=r"objective config is \{.*'replace_after': 3.*this run's is \{.*'replace_after': 2"):
        train_sae(cb, TokenSource(tokens, 4), cfg, objective=CodebookObjective(cb, dataclasses.replace(obj.cfg, replace_after=2)),
                  progress=False)


# ----------------------------------------------------------------------------- the zoo


def test_every_zoo_name_resolves_and_has_a_card():
    names = zoo.available()
    assert names == sorted(zoo.base_models() + zoo.codebook_models()) and {"stories", "tokfsm"} <= set(zoo.base_models())
    for name in names:
        folder = zoo.path(name)
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        assert zoo.card(name) == zoo.card(folder) == json.loads((folder / "card.json").read_text())
    assert all((zoo.path(n) / "codebooks.json").is_file() for n in zoo.codebook_models())


def test_shipped_saes_load_and_fit_their_model():
    found = zoo.saes("stories")
    width = json.loads((zoo.path("stories") / "config.json").read_text())["n_embd"]
    hf, _ = zoo.load_pretrained("stories")
    assert len(found) >= 10 and zoo.saes("counting") == {}
    for run, folder in found.items():
        sae = load_sae(folder)
        assert isinstance(sae, Dictionary) and sae.cfg.d_in == width, run
        sites.resolve(hf, sae.metadata["hook_name"])  # a site of its model
        assert zoo.card(folder)["site"] == sae.metadata["hook_name"], run


def test_wrap_refuses_mismatched_weights_and_strings_outside_the_zoo_loader(tmp_path):
    tiny_hf("gpt2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 16}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=rf"weights in {tmp_path} do not match .*c_attn.bias: saved \(96,\), config expects \(48,\)"):
            zoo.wrap(tmp_path)
        with pytest.raises(ValueError, match="do not match its config.json"):
            zoo.wrap(str(tmp_path))
    with pytest.raises(ValueError, match="takes a torch module; got str .*use nbf.wrap or nbf.load_model"):
        sites.wrap("some/path")
    with pytest.raises(ValueError, match="pass tokenizer= only with a module"):
        zoo.wrap(str(tmp_path), tokenizer=object())
