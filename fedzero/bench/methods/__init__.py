"""One federation run per (setting, method, seed): every method's round loop, in one process.

A suite's method dict is parsed once into a typed spec (`spec`: DeMAMethod or LoRAMethod, the dict
format in its docstring) and run by its runner: `dema` (DeMA adapters; the strategy, "local"
included, from `exchange`) or `lora` (PEFT LoRA and the fedzero.baselines strategies). `context`
holds what both share (RunContext, run_method, the per-client record), `evaluation` the scoring,
`geometry` the update cosines and CMGA's effect.

Every run starts from fresh backbones, trains `rounds` × `local_steps` steps per client with the
same data order and lr schedule for every method, and records per client and round: train loss,
seconds per step and (every `eval_every` rounds and at the end) label-scoring metrics on the
per-round eval subset; at the end, metrics on the full test sets per view; bytes sent and received;
and the first-round cosine between clients' updates (all clients start that round from the same
state, so it is the clean alignment signal, method.md). Per client also: its train label counts,
optimizer steps and training seconds (the budget), and the label scores of every final test record
(the run's "test_records" name them): the report's prior-only control and bootstrap intervals are
computed from these after the fact (fedzero.bench.stats, which defines the format). A client with a
"label_map" (data.py: conflicting objectives) is scored against its mapped labels; its record names
the map, and its train label counts and label scores are in its own labels.

A CMGA run also records, per round, how often and how much CMGA's aggregate differs from FedAvg's
of the same updates ("cmga_effect", see `cmga_effect`): where CMGA has nothing to resolve, the two
methods train identically, and this says so.

The LM task (a suite with task "lm"; ctx.split is then a fedzero.bench.lm_data.LMSplit): clients
train on their domains' text records with the same runners, unchanged (LM loss on every token).
Evaluation is held-out NLL instead of label scoring, from lm_score.score_records (forward only): per
client, every domain's test records at the final round (stored per record: NLL, tokens, bytes, for
the report's bootstrap), and the first round_eval_docs documents of each domain at the eval rounds
(the curves); views own / unseen / global as for topics, metrics NLL per token and per byte (ratios
of sums over a view's records). Distillation exchanges label predictions, so it is classification
only: an LM suite refuses it.
"""

from .context import RunContext, run_method
from .evaluation import view_metrics, zero_shot_metrics, zero_shot_scores
from .exchange import DEMA_STRATEGIES, Aggregation, NoAggregation
from .geometry import block_effect, cmga_effect, dw_cosines, first_round_cosine, lora_dw_factors, pairwise_cosines
from .spec import DeMAMethod, DistillSpec, LoRAMethod, MethodSpec, parse_method

__all__ = ["Aggregation", "DEMA_STRATEGIES", "DeMAMethod", "DistillSpec", "LoRAMethod", "MethodSpec", "NoAggregation",
           "RunContext", "block_effect", "cmga_effect", "dw_cosines", "first_round_cosine", "lora_dw_factors",
           "pairwise_cosines", "parse_method", "run_method", "view_metrics", "zero_shot_metrics", "zero_shot_scores"]
