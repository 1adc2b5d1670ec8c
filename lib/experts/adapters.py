"""Stage 03 aggregation: load the trained adapters side by side and score them.

All adapters are loaded into one peft model (``load_adapter``), so evaluating expert i
on skill j is one harness call with ``adapter_names`` set, and nothing is retrained.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd

from lib.core.evaluation import BASE_ADAPTER, evaluate
from lib.core.modeling import ADAPTER_WEIGHTS, AdapterError, check_adapter_files, load_on_device  # noqa: F401


def adapter_dirs(root: str | Path, skills: list[str]) -> dict[str, Path]:
    """Adapter name -> directory: each expert by skill name, the joint runs as joint_<budget>."""
    root = Path(root) / "models"
    dirs = {s: root / "experts" / s for s in skills}
    for budget_dir in sorted((root / "joint").glob("*")):
        if budget_dir.is_dir() and not budget_dir.name.endswith(".partial"):
            dirs[f"joint_{budget_dir.name}"] = budget_dir
    return dirs


def check_recipe(path: Path, experts) -> None:
    """The adapter in ``path`` was trained with the ``experts`` params in force now (its
    ``params.json``), else AdapterError naming the keys that differ. Under DVC a changed param
    reruns the training; run by hand, a stage would otherwise score a stale adapter silently."""
    try:
        saved = json.loads((path / "params.json").read_text()).get("experts")
    except (OSError, json.JSONDecodeError, AttributeError):
        raise AdapterError(f"{path}/params.json is missing or unreadable: cannot tell which recipe trained this "
                           "adapter; retrain it (dvc repro)") from None
    now = experts.model_dump(mode="json")
    diff = sorted(k for k in set(saved or {}) | set(now) if (saved or {}).get(k) != now.get(k))
    if diff:
        parts = ", ".join(f"experts.{k} {(saved or {}).get(k)!r} there, {now.get(k)!r} in params.yaml" for k in diff)
        raise AdapterError(f"{path}: trained with other params than params.yaml's ({parts}); retrain it "
                           "(dvc repro) or restore those params")


def load_with_adapters(base_dir: str | Path, dirs: dict[str, Path], experts=None):
    """(peft model holding every adapter, tokenizer); a missing or mismatched adapter is a clear
    error, and so is one trained with other ``experts`` params than these (when given)."""
    from peft import PeftModel

    base, tok = load_on_device(base_dir)
    model = None
    for name, path in dirs.items():
        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise AdapterError(f"{path}: no adapter here (adapter_config.json missing); run its stage 03 step")
        check_adapter_files(path)
        if experts is not None:
            check_recipe(path, experts)
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
            else:
                model.load_adapter(str(path), adapter_name=name)
        except Exception as e:
            raise AdapterError(f"{path}: cannot load adapter {name!r} onto {base_dir} ({type(e).__name__}: {e}); "
                               "its rank, target modules or base model do not match (retrain it: dvc repro)") from None
        check_adapter_keys(model, name, path)
    if model is None:
        raise AdapterError("no adapters to load")
    return model.eval(), tok


def check_adapter_keys(model, name: str, path: Path) -> None:
    """The weights file holds exactly the LoRA matrices adapter_config.json declares.

    peft only warns about declared modules missing from the file (they keep their fresh,
    no-op initialisation) and ignores weights for modules the config does not target, so a
    config edited by hand, or weights from another adapter, would load as a different
    adapter without an error."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        saved = set(f.keys())
    with warnings.catch_warnings():  # peft looks for the base's config to decide about embedding layers
        warnings.filterwarnings("ignore", message="Could not find a config file")
        declared = set(get_peft_model_state_dict(model, adapter_name=name))
    missing, extra = sorted(declared - saved), sorted(saved - declared)
    if missing or extra:
        def show(keys):
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

        parts = ([f"adapter_config.json targets modules with no weights in the file ({show(missing)})"] if missing else []) + \
                ([f"the file has weights for modules adapter_config.json does not target ({show(extra)})"] if extra else [])
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: does not match {path / 'adapter_config.json'} for adapter "
                           f"{name!r}: {'; '.join(parts)}. Retrain the adapter (dvc repro) or restore its config")


def score_matrix(model, tok, tests, names: list[str], ev, progress: bool = True) -> pd.DataFrame:
    """Long table (model, skill, n, accuracy, ci_low, ci_high, ece) for every adapter name on ``tests``."""
    rows = []
    for name in names:
        res = evaluate(model, tok, tests, settings=ev, adapter_names=[name] * len(tests), progress=progress)
        per = res.per_skill()
        per.insert(0, "model", "base" if name == BASE_ADAPTER else name)
        rows.append(per)
    return pd.concat(rows, ignore_index=True)


def training_curves(dirs: dict[str, Path]) -> pd.DataFrame:
    frames = []
    for name, path in dirs.items():
        curve = pd.read_csv(path / "train_loss.csv")
        curve.insert(0, "model", name)
        frames.append(curve)
    return pd.concat(frames, ignore_index=True)


def training_info(dirs: dict[str, Path]) -> pd.DataFrame:
    return pd.DataFrame([{"model": n, **json.loads((p / "train_info.json").read_text())} for n, p in dirs.items()])


def corpus_forms(root: str | Path, skills: list[str], n: int = 100):
    """The base's own corpus as test rows (validation split, first ``n`` lines of each form),
    ``skill`` set to the line's form: ``copy``, ``echo`` (an unknown command answering with its
    name) or ``alias:<skill>`` (a training skill under its alias). What each expert should
    leave as the base does it: the locality of issue 15."""
    from datasets import Dataset

    from lib.core import data
    from lib.synth.datasets import ALIAS_FORMS, alias, corpus_rows

    texts = list(data.load(Path(root) / "datasets" / "corpus", ("validation",))["validation"]["text"])
    aliases = {alias(s, form): s for s in skills for form in ALIAS_FORMS}  # whichever form synthesize used
    rows = corpus_rows(texts)
    forms = []
    for prompt in rows["prompt"]:
        word = prompt.split(" ", 1)[0]
        forms.append("copy" if word == "copy" else f"alias:{aliases[word]}" if word in aliases else "echo")
    frame = pd.DataFrame({**rows, "skill": forms}).groupby("skill", sort=True).head(n)
    return Dataset.from_pandas(frame.reset_index(drop=True))


def locality(model, tok, forms, names: list[str], ev) -> pd.DataFrame:
    """Accuracy of every adapter in ``names`` (and the base) on each corpus form, and its
    change from the base's: a local expert leaves these at the base's level."""
    scores = score_matrix(model, tok, forms, [BASE_ADAPTER, *names], ev, progress=False)
    base = scores[scores.model == "base"].set_index("skill").accuracy
    scores["change"] = scores.accuracy - scores.skill.map(base)
    return scores.rename(columns={"skill": "form"})


def locality_figure(loc: pd.DataFrame):
    """Heatmap: accuracy of the base and every adapter (rows) on each corpus form (columns)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    heat = loc.pivot(index="model", columns="form", values="accuracy")
    heat = heat.loc[["base", *[m for m in loc.model.unique() if m != "base"]]]
    plt.figure(figsize=(1 + 0.8 * heat.shape[1], 1 + 0.45 * len(heat)))
    ax = sns.heatmap(heat, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis")
    ax.set(title="accuracy on the base corpus forms", xlabel="corpus form", ylabel="adapter")
    return ax
