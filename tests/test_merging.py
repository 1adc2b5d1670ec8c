"""Formula tests for lib.merge.task_vectors: each merge method against its paper's formula, worked by hand
on small tensors, plus exact task vectors on a tiny peft-wrapped Llama (no downloads)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from lib.core import config
from lib.merge import task_vectors as M
from lib.merge.methods import MERGE_METHODS
from lib.merge.methods.breadcrumbs import breadcrumbs, breadcrumbs_mask
from lib.merge.methods.dare_linear import dare_linear
from lib.merge.methods.dare_ties import dare_ties
from lib.merge.methods.cart import cart
from lib.merge.methods.della import della, magprune
from lib.merge.methods.iso_c import iso_c
from lib.merge.methods.iso_cts import iso_cts
from lib.merge.methods.knots import align, knots_dare, knots_ties
from lib.merge.methods.tsv_m import tsv_m
from lib.merge.methods.linear import linear
from lib.merge.methods.magnitude_prune import magnitude_prune
from lib.merge.methods.task_arithmetic import task_arithmetic
from lib.merge.methods.ties import ties

T = torch.tensor


def close(a, b, **kw):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), **kw)


# ---------------------------------------------------------------- linear, task arithmetic

def test_linear_is_weighted_average():
    a, b, c = T([1.0, -2.0, 4.0]), T([3.0, 0.0, -2.0]), T([0.5, 1.0, 1.0])
    close(linear([a, b, c]), (a + b + c) / 3)
    close(linear([a, b, c], [1.0, 2.0, 1.0]), (1 * a + 2 * b + 1 * c) / 4)
    with pytest.raises(ValueError, match="sum to 0"):
        linear([a, b], [1.0, -1.0])


def test_task_arithmetic_is_lambda_times_sum():
    a, b = T([[1.0, -2.0], [0.0, 3.0]]), T([[0.5, 0.5], [-1.0, 2.0]])
    close(task_arithmetic([a, b], lam=0.3), 0.3 * (a + b))
    close(task_arithmetic([a, b], [2.0, -1.0], lam=0.5), 0.5 * (2 * a - b))
    close(task_arithmetic([a, b]), a + b)


# ---------------------------------------------------------------- TIES

T1, T2 = T([3.0, -1.0, 0.5, 2.0]), T([-2.0, -4.0, 1.0, 1.0])


def test_ties_two_tasks_by_hand():
    # density 0.5 of 4 entries: keep the top 2 magnitudes of each task.
    # trimmed t1 = [3, 0, 0, 2], trimmed t2 = [-2, -4, 0, 0]
    # sum = [1, -4, 0, 2] -> elected sign [+, -, + (tie), +]
    # agreeing: e0 {t1: 3}, e1 {t2: -4}, e2 {} -> 0, e3 {t1: 2}
    close(ties([T1, T2], density=0.5), [3.0, -4.0, 0.0, 2.0])


def test_ties_three_tasks_disjoint_mean_by_hand():
    t3 = T([1.0, -3.0, 0.2, 4.0])  # trimmed [0, -3, 0, 4]
    # sum of trimmed = [3-2+0, 0-4-3, 0, 2+0+4] = [1, -7, 0, 6] -> signs [+, -, +, +]
    # e0: only t1 (3) agrees -> 3 ; e1: t2 (-4), t3 (-3) -> mean -3.5
    # e2: nobody -> 0 ; e3: t1 (2), t3 (4) -> mean 3   (a plain sum would give 6)
    close(ties([T1, T2, t3], density=0.5), [3.0, -3.5, 0.0, 3.0])


def test_ties_sign_election_total_vs_frequency():
    tasks = [T([1.0]), T([1.0]), T([-5.0])]
    close(ties(tasks, density=1.0), [-5.0])  # default: the paper's rule, sign of the sum
    close(ties(tasks, density=1.0, majority_sign_method="total"), [-5.0])  # sum -3 -> minus
    close(ties(tasks, density=1.0, majority_sign_method="frequency"), [1.0])  # 2 of 3 plus -> mean(1, 1)
    with pytest.raises(ValueError, match="majority_sign_method"):
        ties(tasks, density=1.0, majority_sign_method="vote")


def test_ties_weights_scale_values_not_the_election():
    # peft semantics: sign from unweighted trimmed tensors; weights scale inside the disjoint mean.
    tasks = [T([2.0]), T([-1.0])]
    # unweighted sum +1 -> '+'; only task 1 agrees -> 0.25 * 2 = 0.5 (weighted election would pick '-')
    close(ties(tasks, [0.25, 10.0], density=1.0), [0.5])


def test_ties_single_expert_is_its_trimmed_self():
    close(ties([T1], density=0.5), [3.0, 0.0, 0.0, 2.0])
    close(ties([T1], density=1.0), T1)


# ---------------------------------------------------------------- DARE

def test_dare_kept_entries_rescaled_by_one_over_one_minus_p():
    x = torch.arange(1.0, 41.0)
    p = 0.3
    torch.manual_seed(0)
    out = dare_linear([x], density=1 - p)
    kept = out != 0
    assert 0 < int(kept.sum()) < x.numel()  # some dropped, some kept
    close(out[kept], x[kept] / (1 - p))
    assert torch.equal(out[~kept], torch.zeros(int((~kept).sum())))
    # the same seed draws the same mask; DARE-TIES of one expert is that same dropped tensor
    torch.manual_seed(0)
    close(dare_ties([x], density=1 - p), out)


def test_dare_preserves_the_mean_in_expectation():
    x = T([1.0, -2.0, 3.0, -4.0, 0.5, 2.5])
    p = 0.5
    n = 2000
    acc = torch.zeros_like(x)
    for seed in range(n):
        torch.manual_seed(seed)
        acc += dare_linear([x], density=1 - p)
    mean = acc / n
    # per-entry std of the average: |x| sqrt(p/(1-p)) / sqrt(n) ~ 0.022 |x|; without the 1/(1-p)
    # rescale the mean would be (1-p) x = 0.5 x.
    close(mean, x, rtol=0.1, atol=0.0)


def test_merge_task_vectors_seed_is_reproducible_and_leaves_rng_alone():
    tvs = {"a": {"m": torch.randn(8, 8)}, "b": {"m": torch.randn(8, 8)}}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    r1 = M.merge_task_vectors(tvs, "dare_ties", seed=7, density=0.5)
    r2 = M.merge_task_vectors(tvs, "dare_ties", seed=7, density=0.5)
    r3 = M.merge_task_vectors(tvs, "dare_ties", seed=8, density=0.5)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(r1["m"], r2["m"]) and not torch.equal(r1["m"], r3["m"])


# ---------------------------------------------------------------- magnitude pruning, breadcrumbs

def test_magnitude_prune_keeps_top_density_fraction():
    a = T([[0.1, -8.0, 0.3, 5.0], [-0.2, 0.4, -6.0, 0.05]])  # top 3 of 8 by |.|: -8, -6, 5
    b = T([[1.0, 0.0, -2.0, 0.5], [3.0, -0.1, 0.2, 0.3]])  # top 3: 3, -2, 1
    pa = T([[0.0, -8.0, 0.0, 5.0], [0.0, 0.0, -6.0, 0.0]])
    pb = T([[1.0, 0.0, -2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    close(magnitude_prune([a], density=3 / 8), pa)
    close(magnitude_prune([a, b], [0.5, 2.0], density=3 / 8), 0.5 * pa + 2.0 * pb)


def test_breadcrumbs_mask_drops_largest_beta_and_smallest():
    x = T([0.5, -9.0, 3.0, -0.1, 7.0, 2.0, -4.0, 0.3, 6.0, -1.0])
    # by magnitude: 9 (i1) > 7 (i4) > 6 (i8) > 4 (i6) > 3 (i2) > 2 (i5) > 1 (i9) > .5 (i0) > .3 (i7) > .1 (i3)
    # beta 0.1 drops i1 (the outlier); density 0.5 keeps the next five; the smallest four go.
    mask = breadcrumbs_mask(x, density=0.5, beta=0.1)
    assert torch.nonzero(mask).flatten().tolist() == [2, 4, 5, 6, 8]
    y = -x.flip(0)
    keep = x * mask
    close(breadcrumbs([x], density=0.5, beta=0.1), keep)
    close(breadcrumbs([x, y], [1.0, 0.5], density=0.5, beta=0.1), keep + 0.5 * y * breadcrumbs_mask(y, density=0.5, beta=0.1))
    with pytest.raises(ValueError, match="beta \\+ density"):
        breadcrumbs([x], density=0.95, beta=0.1)
    # beta 0 is magnitude pruning
    close(breadcrumbs([x], density=0.3, beta=0.0), magnitude_prune([x], density=0.3))


# ---------------------------------------------------------------- spectral merges: Iso-C, TSV-M

def _low_rank(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64))


def _full(m, n, seed):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _procrustes(a):
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def test_iso_c_is_the_sum_with_a_flat_spectrum():
    """Full-rank updates: the paper's formula (FusionBench's iso_c), σ̄ U Vᵀ of the sum."""
    ds = [_full(6, 5, s) for s in range(3)]
    u, sv, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    close(iso_c(ds), sv.mean() * u @ vh)
    close(iso_c(ds, [0.5] * 3), 0.5 * iso_c(ds))  # equal weights: the scaling factor
    out = torch.linalg.svdvals(iso_c(ds))
    close(out, torch.full_like(out, float(sv.mean())))


def test_iso_c_keeps_a_low_rank_sum_in_its_own_subspace():
    """Two rank-2 updates: the flat spectrum has the sum's 4 directions at the mean of its 4
    singular values, and nothing in the null space (the full spectrum's mean would be 4/5 of it
    over 5 directions, one of them arbitrary)."""
    ds = [_low_rank(7, 5, 2, 1), _low_rank(7, 5, 2, 2)]
    m = sum(ds)
    sv = torch.linalg.svdvals(m)[:4]
    out = iso_c(ds)
    close(torch.linalg.svdvals(out)[:4], torch.full((4,), float(sv.mean()), dtype=torch.float64))
    assert float(torch.linalg.svdvals(out)[4]) < 1e-10
    q = torch.linalg.svd(m, full_matrices=False)[0][:, :4]
    close(q @ (q.T @ out), out)  # the columns stay in the sum's column space


def test_tsv_m_is_the_papers_procrustes_merge_on_full_rank_updates():
    """T = 3 full-rank 6×6 updates: each keeps ⌊6/3⌋ = 2 singular components; U and V stacked,
    each replaced by its nearest orthonormal matrix, then U⊥ Σ V⊥ᵀ (FusionBench's
    compute_and_sum_svd_mem_reduction, written out here)."""
    ds = [_full(6, 6, s) for s in range(3)]
    us, ss, vs = [], [], []
    for d in ds:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :2]), ss.append(s[:2]), vs.append(vh[:2])
    ref = _procrustes(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _procrustes(torch.cat(vs, 0))
    close(tsv_m(ds), ref)
    close(tsv_m(ds, [2.0] * 3), 2.0 * ref)


def test_tsv_m_of_tasks_in_orthogonal_subspaces_is_their_sum():
    """Rank-1 updates on disjoint rows and columns: nothing to decorrelate, TSV-M = Σ ΔW_i."""
    e = torch.eye(6, dtype=torch.float64)
    ds = [3.0 * torch.outer(e[0], e[1]), 2.0 * torch.outer(e[2], e[3]), 1.0 * torch.outer(e[4], e[5])]
    close(tsv_m(ds), sum(ds))


def test_tsv_m_stays_in_the_span_of_the_tasks_low_rank_updates():
    """Three rank-2 updates of a 9×8 matrix keep ⌊8/3⌋ = 2 components each, all meaningful; with a
    rank-1 update the third would keep an arbitrary null-space direction, which the cut drops:
    the merge's columns stay in the span of the tasks' columns either way."""
    for ranks in ((2, 2, 2), (2, 1, 2)):
        ds = [_low_rank(9, 8, r, 10 + i) for i, r in enumerate(ranks)]
        out = tsv_m(ds)
        q = torch.linalg.svd(torch.cat(ds, 1), full_matrices=False)[0][:, :sum(ranks)]
        close(q @ (q.T @ out), out)
        assert torch.linalg.matrix_rank(out) == sum(ranks)


def test_spectral_merges_cut_float32_lora_updates_at_their_rank():
    """A rank-2 ΔW = B·A made in float32, as the experts' task vectors are: past rank 2 its singular
    values are float32 rounding (~1e-7 of the largest), which the cut must drop though the SVD
    runs in float64. Iso-C of one such update then has exactly 2 equal singular values."""
    from lib.merge.methods._spectral import svd_cut

    g = torch.Generator().manual_seed(3)
    d = (torch.randn(32, 2, generator=g) @ torch.randn(2, 24, generator=g)).float()
    assert float(torch.linalg.svdvals(d.double())[2]) > 0  # not exactly rank 2 in float64
    assert svd_cut(d)[1].numel() == 2
    sv = torch.linalg.svdvals(iso_c([d]).double())
    assert abs(float(sv[0] - sv[1])) < 1e-5 * float(sv[0]) and float(sv[2]) < 1e-5 * float(sv[0])
    out = tsv_m([d, (torch.randn(32, 2, generator=g) @ torch.randn(2, 24, generator=g)).float()]).double()
    q2 = torch.linalg.svd(torch.cat([d.double(), out], 1), full_matrices=False)[1]
    assert float(q2[4]) < 1e-4 * float(q2[0])  # the merge of two rank-2 updates has rank 4


def test_iso_cts_is_the_papers_merge_on_full_rank_updates():
    """T = 2 full-rank 6×6 updates, f = 0.5: each task gets round((6 − ⌊0.5·6⌋) / 2) = 2 directions,
    the common subspace the sum's top 6 − 2·2 = 2; each update with the common left subspace
    projected out gives its top 2; stacked, Procrustes-orthonormalised, every σ set to the stacked mean
    (FusionBench's iso_cts, written out here)."""
    ds = [_full(6, 6, s) for s in (4, 5)]
    u, s, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    per_task = round((6 - 3) / 2)
    k_c = 6 - 2 * per_task
    us, ss, vs = [u[:, :k_c]], [s[:k_c]], [vh[:k_c]]
    for d in ds:
        tu, ts, tvh = torch.linalg.svd(d - u[:, :k_c] @ u[:, :k_c].T @ d, full_matrices=False)
        us.append(tu[:, :per_task]), ss.append(ts[:per_task]), vs.append(tvh[:per_task])
    ref = torch.cat(ss).mean() * _procrustes(torch.cat(us, 1)) @ _procrustes(torch.cat(vs, 0))
    close(iso_cts(ds, common_space_fraction=0.5), ref)
    # all of the rank common: Iso-C
    close(iso_cts(ds, common_space_fraction=1.0), iso_c(ds))


def test_iso_cts_gives_low_rank_tasks_their_own_directions():
    """Three rank-2 updates (sum of rank 6): with f = 0.5 the common subspace is 6 − 3·round(3/3) = 3
    directions of the sum and each task adds 1 of its own; the result stays in the tasks' span
    and has a flat spectrum over 6 directions."""
    ds = [_low_rank(9, 8, 2, 20 + i) for i in range(3)]
    out = iso_cts(ds, common_space_fraction=0.5)
    sv = torch.linalg.svdvals(out)
    close(sv[:6], torch.full((6,), float(sv[0]), dtype=torch.float64))
    assert float(sv[6]) < 1e-10
    q = torch.linalg.svd(torch.cat(ds, 1), full_matrices=False)[0][:, :6]
    close(q @ (q.T @ out), out)


def test_cart_is_the_average_plus_low_rank_centred_tasks():
    """CART on full-rank 5×4 updates, k = round(0.5·4) = 2: τ̄ + λ Σ SVD_2(ΔW_i − τ̄); at full rank
    the centred updates cancel and CART is the average whatever λ."""
    ds = [_full(5, 4, s) for s in range(3)]
    mean = sum(ds) / 3

    def low_rank(x, k):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]

    close(cart(ds, [0.7] * 3, rank_ratio=0.5), mean + 0.7 * sum(low_rank(d - mean, 2) for d in ds))
    close(cart(ds, [0.7] * 3, rank_ratio=1.0), mean)
    close(cart([T1, T2], [2.0, 2.0], rank_ratio=0.5), (T1 + T2) / 2)  # a vector: no rank to cut
    with pytest.raises(ValueError, match="rank_ratio"):
        cart(ds, rank_ratio=0.0)


def test_della_prunes_by_magnitude_rank_and_fuses_the_agreeing_entries():
    """magprune: keep probabilities density ± epsilon spread by magnitude rank within each row, the
    kept row set rescaled to the input's L1 norm; with epsilon 0 and density 1 nothing is dropped.
    DELLA then elects signs and takes the weighted mean of the agreeing entries, times mean(w)."""
    a, b = T([[3.0, -1.0, 0.5, 2.0]]), T([[-2.0, -4.0, 1.0, 1.0]])
    # density 1: no drop; elected signs + - + + (sums 1, -5, 1.5, 3); agreeing means
    close(della([a, b], density=1.0, epsilon=0.0), T([[3.0, -2.5, 0.75, 1.5]]))
    close(della([a, b], [0.5, 0.5], density=1.0, epsilon=0.0), 0.5 * T([[3.0, -2.5, 0.75, 1.5]]))
    # unequal weights: sign of Σ w_i τ_i, mean weighted by the agreeing weights, times mean(w)
    close(della([a, b], [1.0, 3.0], density=1.0, epsilon=0.0),
          2.0 * T([[-2.0, (-1.0 - 12.0) / 4, (0.5 + 3.0) / 4, (2.0 + 3.0) / 4]]))
    # the keep probabilities: rank 1 (smallest) gets density - eps, rank n the most
    torch.manual_seed(0)
    x = torch.arange(1.0, 101.0).repeat(4000, 1)  # 4000 rows of magnitudes 1..100
    kept = (magprune(x, 0.5, 0.3) != 0).float().mean(dim=0)
    assert abs(float(kept[0]) - 0.2) < 0.03 and abs(float(kept[-1]) - 0.8) < 0.03 and abs(float(kept[49]) - 0.5) < 0.03
    y = magprune(x[:1], 0.5, 0.3)
    close(y.abs().sum(), x[:1].abs().sum())  # L1 norm kept
    with pytest.raises(ValueError, match="density ± epsilon"):
        della([a, b], density=0.1, epsilon=0.2)


def test_knots_aligns_the_tasks_in_one_basis():
    """align: ΔW_i = U Σ V_iᵀ for every task (one shared U Σ); KnOTS-TIES is TIES on the coordinates,
    mapped back by U Σ."""
    ds = [_low_rank(7, 5, 2, 30 + i) for i in range(3)]
    u, s, coords = align(ds)
    assert s.numel() == 6
    for d, c in zip(ds, coords):
        close(u @ torch.diag(s) @ c, d)
    merged = knots_ties(ds, density=1.0)
    expected = u @ torch.diag(s) @ M.MERGE_METHODS["ties"](coords, density=1.0)
    close(merged, expected)
    # orthogonal tasks (disjoint rows and columns): aligned coordinates never overlap, so the
    # disjoint mean keeps each task whole: KnOTS-TIES at density 1 is their sum
    e = torch.eye(6, dtype=torch.float64)
    orth = [3.0 * torch.outer(e[0], e[1]), 2.0 * torch.outer(e[2], e[3])]
    close(knots_ties(orth, density=1.0), sum(orth))
    torch.manual_seed(0)
    out = knots_dare(ds, density=0.5)
    q = torch.linalg.svd(torch.cat(ds, 1), full_matrices=False)[0][:, :6]
    close(q @ (q.T @ out), out)  # columns stay in the tasks' span


# ---------------------------------------------------------------- edge cases

DENSITY_METHODS = ["ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "della", "knots_ties", "knots_dare"]
OTHER_PARAMS = {"breadcrumbs": {"beta": 0.0}, "della": {"epsilon": 0.0}, "cart": {"rank_ratio": 0.5},
                "iso_cts": {"common_space_fraction": 0.8}}


def _params(name, density):
    return {**({"density": density} if name in DENSITY_METHODS else {}), **OTHER_PARAMS.get(name, {})}


@pytest.mark.parametrize("name", DENSITY_METHODS)
def test_density_zero_is_a_zero_update_not_nan(name):
    out = MERGE_METHODS[name]([T1, T2], **_params(name, 0.0))
    assert torch.equal(out, torch.zeros(4))


@pytest.mark.parametrize("name", sorted(MERGE_METHODS.names()))
def test_single_expert(name):
    # at full density every method returns the single expert itself (linear/TA/others with weight 1)
    close(MERGE_METHODS[name]([T1], **_params(name, 1.0)), T1)


@pytest.mark.parametrize("name", sorted(MERGE_METHODS.names()))
def test_experts_of_different_ranks(name):
    g = torch.Generator().manual_seed(0)
    d2 = torch.randn(6, 2, generator=g) @ torch.randn(2, 5, generator=g)
    d4 = torch.randn(6, 4, generator=g) @ torch.randn(4, 5, generator=g)
    assert torch.linalg.matrix_rank(d2) == 2 and torch.linalg.matrix_rank(d4) == 4
    out = MERGE_METHODS[name]([d2, d4], **_params(name, 0.5))
    assert out.shape == (6, 5) and torch.isfinite(out).all()
    if name == "linear":
        close(out, (d2 + d4) / 2)


@pytest.mark.parametrize("name", sorted(MERGE_METHODS.names()))
def test_empty_and_mismatched(name):
    params = _params(name, 0.5)
    fn = MERGE_METHODS[name]
    with pytest.raises(ValueError, match="empty list"):
        fn([], **params)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        fn([torch.ones(2, 3), torch.ones(3, 2)], **params)
    with pytest.raises(ValueError, match="3 weights for 2"):
        fn([torch.ones(2), torch.ones(2)], [1.0, 1.0, 1.0], **params)


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan")])
def test_density_out_of_range(density):
    with pytest.raises(ValueError, match="density"):
        ties([T1], density=density)


def test_registry_unknown_name_lists_known():
    with pytest.raises(KeyError) as e:
        MERGE_METHODS["nope"]
    for name in MERGE_METHODS.names():
        assert name in str(e.value)
    assert set(MERGE_METHODS.names()) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                                    "magnitude_prune", "breadcrumbs", "iso_c", "tsv_m", "iso_cts", "cart", "della",
                                    "knots_ties", "knots_dare"}


def test_merge_task_vectors_params_and_missing_modules():
    a, b = T([[1.0, 2.0]]), T([[3.0, -2.0]])
    tvs = {"x": {"m1": a, "m2": b}, "y": {"m1": b}}
    out = M.merge_task_vectors(tvs, "linear")
    close(out["m1"], (a + b) / 2)
    close(out["m2"], b / 2)  # y does not adapt m2: a zero update
    out = M.merge_task_vectors(tvs, "task_arithmetic", weights={"y": 2.0, "x": 1.0}, lam=0.5)
    close(out["m1"], 0.5 * (a + 2 * b))
    with pytest.raises(ValueError, match="unknown parameter.*density"):
        M.merge_task_vectors(tvs, "linear", density=0.5)
    with pytest.raises(ValueError, match="missing parameter.*density"):
        M.merge_task_vectors(tvs, "ties")
    with pytest.raises(ValueError, match="unknown \\['z'\\]"):
        M.merge_task_vectors(tvs, "linear", weights={"x": 1.0, "y": 1.0, "z": 1.0})


# ---------------------------------------------------------------- SVD re-factoring, distance

def test_refactor_to_lora_exact_and_optimal():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(7, 3, generator=g) @ torch.randn(3, 5, generator=g)  # rank 3
    for r in (3, 4, 10):
        b, a = M.refactor_to_lora(delta, r)
        assert b.shape[0] == 7 and a.shape[1] == 5 and b.shape[1] == a.shape[0] == min(r, 5)
        close(b @ a, delta, atol=1e-5, rtol=1e-5)
    full = torch.randn(6, 5, generator=g)
    s = torch.linalg.svdvals(full)
    for r in (1, 2, 4):
        b, a = M.refactor_to_lora(full, r)
        assert b.shape == (6, r) and a.shape == (r, 5)
        err = torch.linalg.norm(full - b @ a)
        close(err, torch.sqrt((s[r:] ** 2).sum()), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        M.refactor_to_lora(full, 0)


def test_relative_frobenius_distance():
    b = T([3.0, 4.0])
    assert M.relative_frobenius_distance(b.clone(), b) == 0.0
    assert M.relative_frobenius_distance(T([3.0, 4.5]), b) == pytest.approx(0.1)
    assert M.relative_frobenius_distance(T([0.0, 0.0]), b) == pytest.approx(1.0)
    assert M.relative_frobenius_distance(torch.zeros(2), torch.zeros(2)) == 0.0
    assert M.relative_frobenius_distance(T([1.0, 0.0]), torch.zeros(2)) == math.inf
    # over dicts: one norm over all modules
    assert M.relative_frobenius_distance({"p": T([3.0]), "q": T([4.5])}, {"p": T([3.0]), "q": T([4.0])}) == pytest.approx(0.1)


# ---------------------------------------------------------------- a tiny peft Llama

@pytest.fixture(scope="module")
def tiny():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32)
    base = LlamaForCausalLM(cfg).eval()
    clean = copy.deepcopy(base)
    alpha = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    beta = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(base, alpha, adapter_name="alpha")
    model.add_adapter("beta", beta)
    return clean, model.eval()


def test_task_vectors_equal_scaling_b_a(tiny):
    clean, model = tiny
    tvs = M.task_vectors(model)
    assert list(tvs) == ["alpha", "beta"]
    inner = model.base_model.model
    expected_modules = {"alpha": {"q_proj", "v_proj"}, "beta": {"q_proj", "o_proj"}}
    for name, scaling in (("alpha", 4 / 2), ("beta", 2 / 4)):
        assert {m.rsplit(".", 1)[1] for m in tvs[name]} == expected_modules[name]
        for mod, delta in tvs[name].items():
            layer = inner.get_submodule(mod)
            by_hand = scaling * layer.lora_B[name].weight @ layer.lora_A[name].weight
            close(delta, by_hand.detach())
            assert delta.shape == clean.get_submodule(mod).weight.shape
            assert delta.abs().sum() > 0
    # different ranks, same outer shape: they merge
    q = "model.layers.0.self_attn.q_proj"
    assert torch.linalg.matrix_rank(tvs["alpha"][q]) == 2 and torch.linalg.matrix_rank(tvs["beta"][q]) == 4
    with pytest.raises(KeyError, match="alpha, beta"):
        M.task_vectors(model, ["gamma"])


def test_task_vectors_from_adapter_dirs(tiny, tmp_path):
    clean, model = tiny
    model.save_pretrained(str(tmp_path))
    before = {k: v.clone() for k, v in clean.state_dict().items()}
    tvs = M.task_vectors(clean, {"alpha": tmp_path / "alpha", "beta": tmp_path / "beta"})
    ref = M.task_vectors(model)
    for name in ref:
        assert set(tvs[name]) == set(ref[name])
        for mod in ref[name]:
            close(tvs[name][mod], ref[name][mod])
    assert all(torch.equal(v, before[k]) for k, v in clean.state_dict().items())  # base untouched
    with pytest.raises(ValueError, match="adapter_config.json"):
        M.task_vectors(clean, {"alpha": tmp_path / "nowhere"})


def test_apply_merged_linear_of_one_equals_merge_and_unload(tiny):
    clean, model = tiny
    tvs = M.task_vectors(model, ["alpha"])
    merged = M.merge_task_vectors(tvs, "linear")
    ours = M.apply_merged(clean, merged)
    peft_merged = copy.deepcopy(model).merge_and_unload(adapter_names=["alpha"])
    theirs = peft_merged.state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    changed = 0
    for k in mine:
        close(mine[k], theirs[k], atol=1e-6, rtol=1e-5)
        changed += not torch.equal(mine[k], clean.state_dict()[k])
    assert changed == 2  # q_proj and v_proj weights moved; the base model itself did not
    with pytest.raises(ValueError, match="shape"):
        M.apply_merged(clean, {"model.layers.0.self_attn.q_proj": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="no module"):
        M.apply_merged(clean, {"model.layers.7.nope": torch.zeros(3, 3)})


def test_merged_lora_model_matches_apply_merged(tiny):
    clean, model = tiny
    merged = M.merge_task_vectors(M.task_vectors(model), "ties", density=0.5)
    ids = torch.tensor([[1, 5, 7, 3, 9]])
    with torch.no_grad():
        want = M.apply_merged(clean, merged)(ids).logits
        got = M.merged_lora_model(clean, merged, rank=16)(ids).logits
        low = M.merged_lora_model(clean, merged, rank=1)(ids).logits
    close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(low, want, atol=1e-5)


def test_global_trim_ranks_over_the_whole_task_vector():
    """trim_scope global: each expert keeps its top int(density · n) entries over all its modules (the TIES
    paper); per module, each module keeps its own top share. A module of large entries and one of
    small ones tell them apart: globally the small module is trimmed away."""
    big, small = T([[4.0, -3.0, 2.0, 1.0]]), T([[0.4, -0.3, 0.2, 0.1]])
    tvs = {"x": {"a": big, "b": small}, "y": {"a": -0.5 * big, "b": 2.0 * small}}
    glob = M.merge_task_vectors(tvs, "ties", density=0.5, trim_scope="global")
    # x keeps 4 of 8 entries: all of module a; y its 4 largest: -2, 1.5, -1 (a) and 0.8 (b)
    close(glob["a"], T([[4.0, -3.0, 2.0, 1.0]]))  # a: x's entries win every election (sum sign)
    close(glob["b"], T([[0.8, 0.0, 0.0, 0.0]]))
    per_module = M.merge_task_vectors(tvs, "ties", density=0.5)
    close(per_module["b"], T([[(0.4 + 0.8) / 2, (-0.3 - 0.6) / 2, 0.0, 0.0]]))
    # magnitude pruning: the trimmed vectors summed
    mp = M.merge_task_vectors(tvs, "magnitude_prune", density=0.5, trim_scope="global")
    close(mp["a"], T([[4.0 - 2.0, -3.0 + 1.5, 2.0 - 1.0, 1.0]]))
    close(mp["b"], T([[0.8, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="applies to"):
        M.merge_task_vectors(tvs, "dare_ties", density=0.5, trim_scope="global")
    with pytest.raises(ValueError, match="'module' or 'global'"):
        M.merge_task_vectors(tvs, "ties", density=0.5, trim_scope="layer")
    assert M.method_kwargs("ties", config.make(config.MergeRouteParams, trim_scope="global"))["trim_scope"] == "global"
    assert "trim_scope" not in M.method_kwargs("dare_ties", config.make(config.MergeRouteParams))


def test_merge_variants_score_both_trim_scopes_once():
    """merge_route.both_trim_scopes: the listed merges once more with the other trim scope."""
    from lib.merge.stage import merge_variants

    P = config.make(config.MergeRouteParams, merges=["task_arithmetic", "ties"], both_trim_scopes=["ties"])
    got = [(k, p.trim_scope) for k, p in merge_variants(P)]
    assert got == [("task_arithmetic", "module"), ("ties", "module"), ("ties@global", "global")]
    P = P.model_copy(update={"trim_scope": "global"})
    assert [k for k, _ in merge_variants(P)] == ["task_arithmetic", "ties", "ties@module"]


def test_versus_is_the_paired_per_skill_difference_over_seeds():
    """stage.versus on constructed examples: 2 seeds, 2 skills, 4 prompts each. The new merge is
    right on every 'a' prompt where TIES is wrong (+1 on a, both seeds) and level on 'b'."""
    from types import SimpleNamespace

    import pandas as pd

    from lib.merge.stage import versus

    def ex(correct_a, correct_b):
        return pd.DataFrame({"skill": ["a"] * 4 + ["b"] * 4, "prompt": [f"p{i}" for i in range(8)],
                             "correct": correct_a + correct_b})

    seeds = {s: ({("merge:new", "skills"): ex([1, 1, 1, 1], [1, 0, 1, 0]),
                  ("merge:ties", "skills"): ex([0, 0, 0, 0], [1, 0, 1, 0]),
                  ("merge:old", "skills"): ex([0, 0, 0, 0], [0, 0, 0, 0]),
                  ("joint", "skills"): ex([1, 1, 1, 1], [1, 1, 1, 1])}, {}) for s in (0, 1)}
    systems = {n: SimpleNamespace(kind="joint" if n == "joint" else "merge") for n in ("merge:new", "merge:ties", "merge:old", "joint")}
    st = SimpleNamespace(found={"seeds": seeds}, bench=SimpleNamespace(systems=systems), names=["a", "b"],
                         E=SimpleNamespace(n_boot=200))
    vs = versus(st, "merge:ties")
    assert set(vs["systems"]) == {"merge:new", "merge:old"}  # not the baseline, not other kinds
    new, old = vs["systems"]["merge:new"], vs["systems"]["merge:old"]
    assert new["skills"]["a"]["mean"] == 1.0 and new["skills"]["a"]["lo"] == 1.0
    assert new["skills"]["b"]["mean"] == 0.0 and new["skills"]["b"]["lo"] == 0.0 == new["skills"]["b"]["hi"]
    assert new["better_on"] == ["a"] and new["worse_on"] == []
    assert old["skills"]["b"]["mean"] == -0.5 and old["worse_on"] == ["b"] and old["better_on"] == []
    seeds[1][0][("merge:new", "skills")] = ex([1, 1, 1, 1], [1, 0, 1, 0]).iloc[::-1]
    with pytest.raises(ValueError, match="different a prompts"):
        versus(st, "merge:ties")


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_weighted_sum_is_bit_equal_to_peft_task_arithmetic(n):
    """Task arithmetic, linear and breadcrumbs sum one expert at a time (linear growth in N);
    the result must be peft's stacked sum to the bit, so no number of the study moves."""
    from peft.utils import merge_utils as mu

    from lib.merge.methods._checks import weighted_sum

    g = torch.Generator().manual_seed(n)
    deltas = [torch.randn(64, 96, generator=g) * 1e-2 for _ in range(n)]
    w = torch.rand(n, generator=g) * 2 - 0.5
    assert torch.equal(weighted_sum(deltas, w), mu.task_arithmetic(deltas, w))
    assert torch.equal(task_arithmetic(deltas, w.tolist(), lam=0.7), mu.task_arithmetic(deltas, w * 0.7))


def test_retained_is_the_projection_on_each_task_vector():
    """retained(M, τ_s) = ⟨M, τ_s⟩ / ‖τ_s‖², summed over modules: task arithmetic at λ of
    orthogonal task vectors keeps exactly λ of each; a merge without a module keeps 0 of it."""
    from lib.merge.diagnostics import retained

    tvs = {"a": {"m1": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "m2": torch.tensor([[0.0, 2.0]])},
           "b": {"m1": torch.tensor([[0.0, 3.0], [0.0, 0.0]]), "m2": torch.tensor([[0.0, 0.0]])}}
    ta = M.merge_task_vectors(tvs, "task_arithmetic", weights=[0.6, 0.6])
    half = {"m1": ta["m1"]}  # m2 missing: a's m2 part (4 of its 5 squared norm) is not kept
    got = retained({"ta": ta, "half": half}, tvs).set_index(["method", "skill"]).retained
    assert got[("ta", "a")] == pytest.approx(0.6) and got[("ta", "b")] == pytest.approx(0.6)
    assert got[("half", "a")] == pytest.approx(0.6 * 1 / 5) and got[("half", "b")] == pytest.approx(0.6)
