"""The canonical shared space: generalised CCA from statistics only (fedzero/adapters/dema/canonical.py),
the canonical in-projector, anchor whitening, and `fedzero align --projector canonical`."""

import json

import pytest
import torch
import yaml

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.adapters.dema.alignment import coordinate_alignment, layer_states, projected_states
from fedzero.adapters.dema.canonical import (anchor_states, canonical_targets, client_basis, fit_canonical,
                                             fit_projection)
from fedzero.adapters.dema.layer import AnchorInProjector, CanonicalInProjector
from fedzero.cli import main
from fedzero.data import ByteTokenizer

from conftest import tiny_llama
from test_simulate import tiny_run

TOK = ByteTokenizer()
SMALL = dict(rank=3, num_experts=2, num_slots=2, share="experts-only", num_anchors=12)
WORDS = ("red", "blue", "green", "cat", "dog", "sun", "rain", "tree", "sea", "road", "bird", "fish")
TEXTS = [f"{a} {b} {c}" for a, b, c in zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[7:] + WORDS[:7])]
HELD_OUT = ["the cat sat", "a blue road", "rain on the sea", "green fish", "sun and tree", "dogs"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def byte_llama(seed=1, hidden=32, layers=3):
    return tiny_llama(seed=seed, vocab=259, hidden=hidden, layers=layers, heads=4, kv_heads=2)


def projection_matrix(basis):
    return basis @ basis.T


# -- the hand-made case: two clients see one latent through different invertible maps ----------------------
def latent_clients(n_fit=40, n_new=15):
    """States of two clients on the same texts: H_k = Z A_k + b_k, Z a 3-dim latent per text, A_1 [3, 3]
    invertible, A_2 [3, 5] injective (a wider backbone), b_k offsets."""
    z = randn(n_fit + n_new, 3, seed=1)
    maps = [(randn(3, 3, seed=2), randn(3, seed=3) * 5), (randn(3, 5, seed=4), randn(5, seed=5) * -2)]
    states = [z @ a + b for a, b in maps]
    return [h[:n_fit] for h in states], [h[n_fit:] for h in states]


def test_linear_maps_of_one_latent_are_aligned_exactly_on_new_texts():
    fit, new = latent_clients()
    bases = [client_basis(h, 3) for h in fit]
    # Both clients' anchor states span the same directions of the text space: the centred latent's.
    torch.testing.assert_close(projection_matrix(bases[0]), projection_matrix(bases[1]))
    targets, shared = canonical_targets(bases, 3)
    assert shared.tolist() == pytest.approx([1.0, 1.0, 1.0])               # every code held by both
    z = []
    for h_fit, h_new in zip(fit, new):
        mu, w = fit_projection(h_fit, targets, ridge=0.0)
        torch.testing.assert_close((h_fit - mu) @ w, targets)              # the fit texts land on G
        z.append((h_new - mu) @ w)
    torch.testing.assert_close(z[0], z[1])                                   # and new texts on the same codes
    assert coordinate_alignment(z[0], z[1]) == pytest.approx(1.0, abs=1e-9)


# -- client_basis ---------------------------------------------------------------------------------------------
def test_the_basis_is_the_whitened_principal_scores():
    h = randn(20, 6, seed=7) @ torch.diag(torch.tensor([5.0, 4, 3, 2, 1, 0.5], dtype=torch.float64))
    q = client_basis(h, 4)
    assert q.shape == (20, 4) and q.dtype == torch.float64
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.zeros(4, dtype=torch.float64))          # centred
    u, s, vh = torch.linalg.svd(h - h.mean(0), full_matrices=False)
    torch.testing.assert_close(q, (h - h.mean(0)) @ vh[:4].T / s[:4])                    # H V S^-1
    torch.testing.assert_close(client_basis(h * 1e3 + 7, 4), q)                           # scale- and shift-free


@pytest.mark.parametrize("components, message", [
    (0, r"m=0: must be in 1..5"), (6, r"m=6: must be in 1..5 \(min\(N - 1, d\) for N=8 anchor texts of width d=5\)"),
])
def test_the_basis_refuses_impossible_components(components, message):
    with pytest.raises(ValueError, match=message):
        client_basis(randn(8, 5), components)


def test_the_basis_refuses_states_that_span_too_few_directions():
    flat = randn(10, 2) @ randn(2, 6, seed=1)                # rank 2 in a width of 6
    with pytest.raises(ValueError, match=r"span only 2 dimension\(s\); canonical components m=3"):
        client_basis(flat, 3)
    with pytest.raises(ValueError, match=r"expected \[N texts, d\]"):
        client_basis(randn(10), 1)


# -- canonical_targets ----------------------------------------------------------------------------------------
def test_targets_are_the_top_eigenvectors_scaled_to_n():
    bases = [client_basis(randn(30, 8, seed=s), 5) for s in range(3)]
    weights = [1.0, 2.0, 1.0]
    g, shared = canonical_targets(bases, 4, weights)
    assert g.shape == (30, 4)
    torch.testing.assert_close(g.T @ g, 30 * torch.eye(4, dtype=torch.float64))        # G^T G = N I
    torch.testing.assert_close(g.sum(0), torch.zeros(4, dtype=torch.float64))           # centred, as the bases
    total = sum(w / 4 * projection_matrix(q) for w, q in zip(weights, bases))
    values, vectors = torch.linalg.eigh(total)
    torch.testing.assert_close(shared, values.flip(0)[:4])                              # top eigenvalues, descending
    top = vectors[:, -4:]
    torch.testing.assert_close(projection_matrix(g) / 30, projection_matrix(top))       # the same subspace
    assert all(0 < v <= 1 for v in shared.tolist())
    # one sign per code, fixed: its largest-magnitude entry is positive
    assert (g[g.abs().argmax(0), torch.arange(4)] > 0).all()


def test_a_client_alone_gets_its_own_principal_space():
    """With m = r: G spans the client's top-r principal directions of the texts, and z is its whitened
    principal-component scores (unit mean square) up to a rotation O. (Every eigenvalue is 1 for one
    basis, so which rotation is the SVD's choice; with m > r even which r of the m directions is.)"""
    h, new = randn(25, 6, seed=3), randn(7, 6, seed=4)
    g, shared = canonical_targets([client_basis(h, 4)], 4)
    assert shared.tolist() == pytest.approx([1.0] * 4)
    mu, w = fit_projection(h, g, ridge=0.0)
    _, s, vh = torch.linalg.svd(h - h.mean(0), full_matrices=False)

    def pca(x):
        return (x - mu) @ vh[:4].T / s[:4] * 25 ** 0.5

    rotation = pca(h).T @ g / 25
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close((h - mu) @ w, pca(h) @ rotation)
    torch.testing.assert_close((new - mu) @ w, pca(new) @ rotation)


def test_all_components_make_every_direction_shared_which_is_why_m_must_be_small():
    """Unrelated clients of width >= N - 1: each one's N - 1 centred directions span the whole centred
    text space, so every code is "held by every client" and the fit says nothing."""
    bases = [client_basis(randn(10, 12, seed=s), 9) for s in (1, 2)]
    _, shared = canonical_targets(bases, 9)
    assert shared.tolist() == pytest.approx([1.0] * 9)
    # With 3 components each, two random 3-dim spans of the 9-dim text space share little (seeded):
    # an eigenvalue of (P_1 + P_2) / 2 is (1 + cos theta) / 2 for each principal angle theta between them.
    _, few = canonical_targets([client_basis(randn(10, 12, seed=s), 3) for s in (1, 2)], 3)
    assert few.mean() < 0.8


def test_targets_refuse_what_they_cannot_combine():
    q = client_basis(randn(10, 4), 3)
    with pytest.raises(ValueError, match="at least one client basis"):
        canonical_targets([], 2)
    with pytest.raises(ValueError, match=r"rank r=7: the canonical space has at most 6 dimensions"):
        canonical_targets([q, q], 7)
    with pytest.raises(ValueError, match=r"basis 1 has shape \(9, 3\)"):
        canonical_targets([q, q[:9]], 2)
    with pytest.raises(ValueError, match="basis 0 does not have orthonormal columns"):
        canonical_targets([q * 2], 2)
    with pytest.raises(ValueError, match="one positive weight per basis"):
        canonical_targets([q, q], 2, [1.0, 0.0])


# -- fit_projection -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, d", [(30, 6), (8, 20)])     # more texts than width, and fewer
def test_the_ridge_fit_is_the_closed_form(n, d):
    h, g = randn(n, d, seed=1) * 3 + 1, randn(n, 4, seed=2)
    mu, w = fit_projection(h, g, ridge=0.1)
    centred = h - h.mean(0)
    lam = 0.1 * centred.pow(2).sum() / min(n, d)           # ridge x the mean squared singular value
    expected = torch.linalg.solve(centred.T @ centred + lam * torch.eye(d, dtype=torch.float64), centred.T @ g)
    torch.testing.assert_close(mu, h.mean(0))
    torch.testing.assert_close(w, expected)
    # ridge 0: the minimum-norm least-squares solution
    torch.testing.assert_close(fit_projection(h, g, ridge=0.0)[1], torch.linalg.pinv(centred) @ g)


def test_the_fit_does_not_depend_on_the_states_scale():
    h, g, new = randn(20, 5, seed=1), randn(20, 3, seed=2), randn(4, 5, seed=3)
    mu, w = fit_projection(h, g, ridge=0.05)
    mu2, w2 = fit_projection(h * 1000, g, ridge=0.05)
    torch.testing.assert_close((new * 1000 - mu2) @ w2, (new - mu) @ w)


def test_the_fit_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match=r"expected \[N, d\] and \[N, r\]"):
        fit_projection(randn(5, 3), randn(6, 2), ridge=0.1)
    with pytest.raises(ValueError, match="canonical ridge must be >= 0"):
        fit_projection(randn(5, 3), randn(5, 2), ridge=-1.0)


# -- across clients of different depths, per slot --------------------------------------------------------------
def test_fit_canonical_gives_each_slot_one_target_and_each_client_one_vote():
    states = {"deep": [randn(20, 6, seed=s) for s in range(4)], "shallow": [randn(20, 5, seed=10 + s) for s in range(2)]}
    slots = {"deep": [0, 0, 1, 1], "shallow": [0, 1]}
    fitted, shared = fit_canonical(states, slots, rank=2, components=3, ridge=0.01)
    assert set(shared) == {0, 1} and [len(fitted[c]) for c in ("deep", "shallow")] == [4, 2]
    # slot 0 by hand: the deep client's two layers weigh 1/2 each, the shallow client's one layer 1
    bases = [client_basis(states["deep"][0], 3), client_basis(states["deep"][1], 3), client_basis(states["shallow"][0], 3)]
    targets, expected_shared = canonical_targets(bases, 2, [0.5, 0.5, 1.0])
    torch.testing.assert_close(shared[0], expected_shared)
    for cid, layer in (("deep", 0), ("deep", 1), ("shallow", 0)):
        mu, w = fitted[cid][layer]
        expected_mu, expected_w = fit_projection(states[cid][layer], targets, 0.01)
        torch.testing.assert_close(mu, expected_mu)
        torch.testing.assert_close(w, expected_w)


def test_fit_canonical_refuses_mismatched_layers():
    with pytest.raises(ValueError, match="client b: 1 layers of anchor states, 2 slot assignments"):
        fit_canonical({"a": [randn(9, 4)], "b": [randn(9, 4)]}, {"a": [0], "b": [0, 1]}, rank=2, components=2, ridge=0)


# -- the canonical in-projector ---------------------------------------------------------------------------------
def canonical_handles(models, config, texts=TEXTS, placement="parallel"):
    """The whole protocol in one process: anchor states, the fit, inject_dema(canonical=)."""
    states = {cid: anchor_states(m, TOK, texts, placement=placement) for cid, m in models.items()}
    slots = {cid: [config.slot_of_layer(l, len(s)) for l in range(len(s))] for cid, s in states.items()}
    fitted, _ = fit_canonical(states, slots, rank=config.rank, components=config.canonical_dims,
                              ridge=config.canonical_ridge)
    return {cid: inject_dema(m, config, canonical=fitted[cid]) for cid, m in models.items()}, states, fitted


@pytest.mark.parametrize("placement", ["parallel", "side"])
def test_the_canonical_projector_computes_the_fitted_map_and_leaves_logits_unchanged(placement):
    model = byte_llama()
    ids = torch.randint(0, 256, (2, 7), generator=gen(0))
    with torch.no_grad():
        before = model(ids).logits
    config = DeMAConfig(**SMALL, projector="canonical", placement=placement)
    handles, states, fitted = canonical_handles({"a": model}, config, placement=placement)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    # what the adapter reads at round 0 is what the fit read: z = (x - mu) W on the fit texts
    z = layer_states(handles["a"], TOK, TEXTS)
    for layer, ((mu, w), x) in enumerate(zip(fitted["a"], states["a"])):
        torch.testing.assert_close(z[layer], ((x.double() - mu) @ w).float(), atol=1e-4, rtol=1e-4)
    # buffers only: nothing of a frozen canonical projector trains or travels
    assert all(".in_proj." not in k for k in handles["a"].private_state_dict())


def test_the_same_backbone_twice_aligns_at_one_on_other_texts():
    config = DeMAConfig(**SMALL, projector="canonical")
    handles, _, _ = canonical_handles({"x": byte_llama(seed=5), "y": byte_llama(seed=5)}, config)
    zx, zy = (projected_states(handles[c], TOK, HELD_OUT) for c in ("x", "y"))
    assert all(coordinate_alignment(zx[s], zy[s]) == pytest.approx(1.0, abs=1e-5) for s in zx)


def test_canonical_plus_learned_adds_a_private_zero_initialised_residual():
    config = DeMAConfig(**SMALL, projector="canonical+learned")
    handles, _, fitted = canonical_handles({"a": byte_llama()}, config)
    handle = handles["a"]
    private = handle.private_state_dict()
    residuals = sorted(k for k in private if ".in_proj." in k)
    assert residuals == [f"layers.{l}.in_proj.residual" for l in range(3)]
    assert all(not private[k].any() for k in residuals)
    proj = handle.private.layers[0].in_proj
    x = randn(4, 32, seed=2).float()
    mu, w = fitted["a"][0]
    torch.testing.assert_close(proj(x), ((x.double() - mu) @ w).float(), atol=1e-5, rtol=1e-5)
    loss = proj(x).pow(2).sum()
    loss.backward()
    assert proj.residual.grad is not None and proj.residual.grad.abs().sum() > 0
    assert proj.weight.grad is None                                        # the canonical map itself is fixed
    with torch.no_grad():
        proj.residual.fill_(0.01)
    torch.testing.assert_close(proj(x), (x - proj.mu) @ (proj.weight + 0.01).T)
    assert len(handle.param_groups(1e-3)) == 1                             # trained at the adapters' lr


def test_injection_asks_for_the_fit_it_cannot_make():
    config = DeMAConfig(**SMALL, projector="canonical")
    with pytest.raises(ValueError, match=r"projector 'canonical' needs the canonical fit across clients"):
        inject_dema(byte_llama(), config)
    with pytest.raises(ValueError, match="canonical holds 2 .* this model has 3 decoder layers"):
        inject_dema(byte_llama(), config, canonical=[(torch.zeros(32), torch.zeros(32, 3))] * 2)
    with pytest.raises(ValueError, match=r"canonical, layer 0: .* this layer needs \[32\] and \[32, 3\]"):
        inject_dema(byte_llama(), config, canonical=[(torch.zeros(16), torch.zeros(16, 3))] * 3)
    with pytest.raises(ValueError, match="non-finite"):
        inject_dema(byte_llama(), config, canonical=[(torch.zeros(32), torch.full((32, 3), float("nan")))] * 3)
    with pytest.raises(ValueError, match=r"inject_dema\(canonical=\) is for projector 'canonical'"):
        inject_dema(byte_llama(), DeMAConfig(**SMALL), canonical=[(torch.zeros(32), torch.zeros(32, 3))] * 3)


def test_the_projector_keeps_nn_linear_layout():
    proj = CanonicalInProjector(5, 2)
    mu, w = randn(5).float(), randn(5, 2, seed=1).float()
    proj.set_projection(mu, w)
    assert proj.weight.shape == (2, 5) and "mu" in dict(proj.named_buffers()) and not list(proj.parameters())
    x = randn(3, 5, seed=2).float()
    torch.testing.assert_close(proj(x), (x - mu) @ w)


# -- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(projector="canonical", rank=8, canonical_components=4), r"canonical_components \(4\) must be >= rank \(8\)"),
    (dict(projector="canonical", rank=8, num_anchors=16), r"num_anchors \(16\) must be > canonical_components \(16, default 2 x rank\)"),
    (dict(projector="canonical", canonical_ridge=-0.1), "canonical_ridge must be >= 0"),
    (dict(projector="canonical", canonical_components=2.5), "canonical_components must be an integer"),
    (dict(projector="canonical", anchor_out=True), "anchor_out needs projector 'anchor'"),
    (dict(projector="learned", anchor_whiten=True), "anchor_whiten needs projector 'anchor'"),
])
def test_config_refuses_inconsistent_canonical_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        DeMAConfig(**fields)


def test_config_defaults_and_stand_in():
    config = DeMAConfig(rank=16, projector="canonical+learned")
    assert config.uses_canonical and not config.uses_anchors and not config.shares_projectors
    assert config.canonical_dims == 32 and config.canonical_ridge == 0.01
    stand_in = config.learned_stand_in()
    assert (stand_in.projector, stand_in.share) == ("learned", "experts-only")
    assert stand_in.shared_signature() == config.shared_signature()
    assert DeMAConfig.from_json(config.to_json()) == config


# -- anchor whitening --------------------------------------------------------------------------------------------
def test_whitened_anchor_directions_are_orthonormal_and_rotation_invariant():
    pooled = randn(12, 6, seed=1).float() + 3 * randn(1, 6, seed=2).float()       # a common direction
    proj = AnchorInProjector(6, 4, whiten=True)
    proj.set_anchors(pooled)
    ridge = AnchorInProjector.WHITEN_RIDGE
    w0 = proj.weight0.double()
    unit = (pooled[:4] - pooled.mean(0)).double()
    unit = unit / unit.norm(dim=1, keepdim=True)
    gram = unit @ unit.T
    torch.testing.assert_close(w0 @ w0.T, gram @ torch.linalg.inv(gram + ridge * torch.eye(4, dtype=torch.float64)),
                               atol=1e-5, rtol=1e-5)                            # I, up to the ridge
    # the whitened codes are the raw relative codes times (K + ridge)^-1/2
    plain = AnchorInProjector(6, 4)
    plain.set_anchors(pooled)
    x = randn(5, 6, seed=3).float()
    values, vectors = torch.linalg.eigh(gram + ridge * torch.eye(4, dtype=torch.float64))
    inv_sqrt = (vectors * values.rsqrt()) @ vectors.T
    torch.testing.assert_close(proj(x).double(), plain(x).double() @ inv_sqrt.T, atol=1e-5, rtol=1e-5)
    # a rotated and rescaled backbone gives the same codes
    rotation = torch.linalg.qr(randn(6, 6, seed=4))[0].float()
    turned = AnchorInProjector(6, 4, whiten=True)
    turned.set_anchors(pooled @ rotation * 4.0)
    torch.testing.assert_close(turned(x @ rotation * 4.0), proj(x), atol=1e-5, rtol=1e-4)


def test_whitening_reaches_the_injected_anchor_projector():
    config = DeMAConfig(**{**SMALL, "rank": 4}, projector="anchor", anchor_whiten=True)
    handle = inject_dema(byte_llama(), config, tokenizer=TOK)
    w0 = handle.private.layers[0].in_proj.weight0.double()
    assert (w0 @ w0.T - torch.eye(4, dtype=torch.float64)).abs().max() < 0.05


# -- fedzero align --projector canonical --------------------------------------------------------------------------
def canonical_run(tmp_path, num_anchors=12):
    config = tiny_run(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["dema"]["num_anchors"] = num_anchors          # rank 4: 8 components by default, 12 fit texts
    config.write_text(yaml.safe_dump(data))
    fit = tmp_path / "fit.jsonl"
    fit.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return config, fit


def test_cli_fits_on_the_fit_texts_and_measures_on_the_others(tmp_path, capsys):
    config, fit = canonical_run(tmp_path)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:2] + HELD_OUT))   # two overlap
    out = tmp_path / "align.json"
    assert main(["align", "--config", str(config), "--projector", "canonical", "--fit-texts", str(fit),
                 "--texts", str(texts), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "canonical space fitted on 12 other texts (8 components per layer, ridge 0.01)" in printed
    assert f"canonical space fitted on: the first 12 texts of {fit} (--fit-texts)" in printed
    report = json.loads(out.read_text())
    assert report["texts"] == len(HELD_OUT)
    assert "less the 2 the canonical space was fitted on" in report["texts_source"]
    assert report["canonical"]["fit_texts"] == 12 and set(report["canonical"]["shared"]) == {"0", "1"}
    assert all(len(v) == 4 and all(0 <= x <= 1 + 1e-9 for x in v) for v in report["canonical"]["shared"].values())
    assert report["clients"]["a"]["projector"] == "canonical"


@pytest.mark.parametrize("args, num_anchors, message", [
    (["--fit-texts", "FIT"], 12, "--fit-texts is for projector 'canonical' or 'canonical+learned', not 'learned'"),
    (["--projector", "canonical", "--fit-texts", "FIT"], 20, "has 12 texts; 20 are needed (dema.num_anchors) (--fit-texts)"),
    (["--projector", "canonical", "--fit-texts", "missing.jsonl"], 12, "anchor file missing.jsonl not found (--fit-texts)"),
])
def test_cli_canonical_errors_name_the_setting(tmp_path, capsys, args, num_anchors, message):
    config, fit = canonical_run(tmp_path, num_anchors)
    args = [str(fit) if a == "FIT" else a for a in args]
    assert main(["align", "--config", str(config), *args]) == 2
    assert message in capsys.readouterr().err
