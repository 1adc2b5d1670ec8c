"""Task-vector geometry and weight disentanglement (lib/merge/diagnostics.py) on tiny tensors and a tiny model."""
from __future__ import annotations

import pytest
import torch

from conftest import peaked_tiny_llama
from lib.core.config import EvalParams, make
from lib.core.tokenization import build_char_tokenizer
from lib.merge import diagnostics as D

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def test_cosine_matrix_is_the_formula():
    a = {Q: torch.tensor([[1.0, 0.0]]), V: torch.tensor([0.0, 0.0])}
    b = {Q: torch.tensor([[0.0, 2.0]]), V: torch.tensor([0.0, 0.0])}
    c = {Q: torch.tensor([[-3.0, 0.0]]), V: torch.tensor([0.0, 0.0])}
    d = {Q: torch.tensor([[1.0, 1.0]]), V: torch.tensor([1.0, 1.0])}
    cos = D.cosine_matrix({"a": a, "b": b, "c": c, "d": d})
    assert cos.loc["a", "a"] == pytest.approx(1.0) and cos.loc["a", "b"] == pytest.approx(0.0)
    assert cos.loc["a", "c"] == pytest.approx(-1.0) and cos.loc["a", "d"] == pytest.approx(0.5)
    assert (cos.values == cos.values.T).all()
    with pytest.raises(ValueError, match="same modules"):
        D.cosine_matrix({"a": a, "e": {Q: a[Q]}})


def test_disentanglement_error_is_zero_for_a_null_vector_and_positive_for_a_large_one():
    tok = build_char_tokenizer()
    base = peaked_tiny_llama(tok)
    torch.manual_seed(0)
    shape = {n: base.get_submodule(n).weight.shape for n in (Q, V)}
    tau = {n: 0.5 * torch.randn(s) for n, s in shape.items()}
    zero = {n: torch.zeros(s) for n, s in shape.items()}
    big = {n: 20 * torch.randn(s) for n, s in shape.items()}
    prompts = {t: [{"prompt": f"inc {i}{i + 3} =", "answer": "1", "skill": "inc"} for i in range(6)] for t in ("a", "b", "c")}
    E = make(EvalParams, batch_size=8, n_boot=100)
    # Adding a zero vector changes nothing on task a's prompts, at every coefficient; on task
    # b's prompts the merged model is θ0 + α τ_a against θ0 alone, which can differ.
    t = D.disentanglement_error(base, tok, {"a": tau, "b": zero}, prompts, [("a", "b")], [0.5, 1.0], E)
    assert len(t) == 2 * 2 * 2 and (t[t.task == "a"].error == 0).all()
    # A large unrelated vector changes the answers on task a's prompts.
    t = D.disentanglement_error(base, tok, {"a": tau, "c": big}, prompts, [("a", "c")], [1.0], E)
    assert t[t.task == "a"].error.iloc[0] > 0
    summary = D.disentanglement_summary(t)
    assert summary.shape == (1, 1) and 0 < summary.iloc[0, 0] <= 1


def test_singular_task_interference_is_zero_for_orthogonal_tasks_and_the_formula_otherwise():
    """Gargiulo et al. 2025's STI: orthogonal singular subspaces give 0; two rank-1 tasks on the
    same directions, s1 u vᵀ and s2 u vᵀ, give ‖[[0,1],[1,0]] diag(s1, s2) [[0,1],[1,0]]‖₁ = s1 + s2,
    whatever the SVD's signs (the second one given as (−u)(−v)ᵀ)."""
    import torch

    from lib.merge.diagnostics import singular_task_interference

    e = torch.eye(5, dtype=torch.float64)
    orth = singular_task_interference([3 * torch.outer(e[0], e[1]), 2 * torch.outer(e[2], e[3])])
    assert orth["sti"] < 1e-12 and orth["relative"] < 1e-12
    u, v = e[0] + e[1], e[2] - e[4]
    u, v = u / u.norm(), v / v.norm()
    same = singular_task_interference([3.0 * torch.outer(u, v), 2.0 * torch.outer(-u, -v)])
    assert abs(same["sti"] - 5.0) < 1e-9 and abs(same["relative"] - 1.0) < 1e-9
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert abs(singular_task_interference([a, b])["sti"] - singular_task_interference([-a, b])["sti"]) < 1e-9


def test_sti_table_has_one_row_per_shared_module_with_its_type():
    import torch

    from lib.merge.diagnostics import singular_task_interference, sti_table

    g = torch.Generator().manual_seed(0)
    r = lambda: torch.randn(5, 1, generator=g) @ torch.randn(1, 4, generator=g)  # noqa: E731
    tvs = {"a": {"layers.0.q_proj": r(), "layers.0.v_proj": r(), "layers.1.q_proj": r()},
           "b": {"layers.0.q_proj": r(), "layers.0.v_proj": r()}}  # b does not adapt layers.1.q_proj
    tab = sti_table(tvs)
    assert tab.module.tolist() == ["layers.0.q_proj", "layers.0.v_proj"] and tab.module_type.tolist() == ["q_proj", "v_proj"]
    expected = singular_task_interference([tvs["a"]["layers.0.v_proj"], tvs["b"]["layers.0.v_proj"]])["relative"]
    assert abs(tab.relative.iloc[1] - expected) < 1e-12 and (tab.relative > 0).all()
