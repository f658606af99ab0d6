"""S4 search (Chen et al., ICLR 2023): try strategy assignments per spindle group on a small budget.

Coordinate search: start from the paper's S4-model (G1=A,L G2=A,P G3=A,P,B G4=P,B,L); for each group in
turn, try the candidate strategy sets, keep the best by accuracy on a development split carved from the
training data (never the held-out test set), until the trial budget is spent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .backbone import Backbone
from .data import Dataset
from .methods.presets import presets, resolve, spindle_groups
from .model import HeadConfig
from .training import TrainConfig, build_model, evaluate, train

CANDIDATES = (("adapter", "lora"), ("adapter", "prefix"), ("adapter", "prefix", "bitfit"), ("prefix", "bitfit", "lora"),
              ("adapter",), ("lora",), ("bitfit",), ("prefix",))
SHORT = {"adapter": "A", "prefix": "P", "bitfit": "B", "lora": "L"}


@dataclass
class Trial:
    groups: list[list[str]]
    params: int
    dev_accuracy: float
    seconds: float

    def label(self) -> list[str]:
        return ["".join(SHORT[s] for s in g) or "-" for g in self.groups]


def split_dev(data: Dataset, dev_fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, list]:
    """Carve a development split out of the training examples."""
    ex = list(data.train)
    random.Random(seed).shuffle(ex)
    n_dev = max(1, int(len(ex) * dev_fraction))
    return Dataset(data.name, data.labels, ex[n_dev:], data.test), ex[:n_dev]


def run_trial(backbone: Backbone, tokenizer, data: Dataset, dev: list, groups: list[list[str]],
              cfg: TrainConfig) -> Trial:
    method = resolve("s4", backbone.config.num_hidden_layers, s4_groups=groups)
    model = build_model(backbone, method, HeadConfig(len(data.labels)), cfg.seed)
    res = train(model, tokenizer, data, cfg, progress=False, evaluate_after=False)
    acc = evaluate(model, tokenizer, dev, cfg.max_length, cfg.eval_batch_size)
    return Trial(groups, sum(p.numel() for p in model.adapters.parameters()), acc, res.train_seconds)


def search(backbone: Backbone, data: Dataset, cfg: TrainConfig, trials: int, log=print) -> list[Trial]:
    """Coordinate search over groups; returns every trial in the order tried (best first is not implied)."""
    tokenizer = backbone.tokenizer()
    train_data, dev = split_dev(data, seed=cfg.seed)
    best_groups = [list(g) for g in presets()["s4"]["groups"]]
    done: list[Trial] = []
    seen = set()

    def attempt(groups):
        key = tuple(tuple(g) for g in groups)
        if key in seen or len(done) >= trials:
            return None
        seen.add(key)
        t = run_trial(backbone, tokenizer, train_data, dev, groups, cfg)
        done.append(t)
        log(f"trial {len(done)}/{trials}: {' '.join(t.label())}  dev accuracy {t.dev_accuracy:.3f}  ({t.seconds:.1f}s)")
        return t

    best = attempt(best_groups)
    layer_groups = spindle_groups(backbone.config.num_hidden_layers)
    for g in (g for g in range(4) if layer_groups[g]):  # an empty group (few layers) has nothing to try
        for cand in CANDIDATES:
            groups = [list(x) for x in best_groups]
            groups[g] = list(cand)
            t = attempt(groups)
            if t is not None and t.dev_accuracy > best.dev_accuracy:
                best, best_groups = t, groups
    return done


def table(trials: list[Trial]) -> str:
    best = max(trials, key=lambda t: t.dev_accuracy)
    rows = ["| trial | G1 | G2 | G3 | G4 | adapter params | dev accuracy | train s |", "|---|---|---|---|---|---|---|---|"]
    for i, t in enumerate(trials, 1):
        mark = " **best**" if t is best else ""
        rows.append(f"| {i} | " + " | ".join(t.label()) + f" | {t.params:,} | {t.dev_accuracy:.3f}{mark} | {t.seconds:.2f} |")
    return "\n".join(rows)
