"""From results.json to the report: tables (markdown) and plots (PNG).

Every number is computed from the run records: per run, a metric is the mean over its clients;
level tables give mean ± sample std (ddof 1) of that over seeds ("n=1" where one seed ran, so no std).
Views: own (the client's topic), unseen (the federation's other topics), global (all of them).

Gains (a method minus its control) are paired by seed and by test record, from the per-record label
scores every run stores (fedzero.bench.stats): the point estimate is the mean over seeds of the gain
on all records, the interval a 95% paired bootstrap (seeds, then records within each seed). The
prior-only control of a local-only method is that method with each client's label prior re-fit to
the federation's pooled train label counts; what a method gains above it is transfer beyond label
priors. Runs recorded before per-record scores were stored still render: their gains come from the
final metrics, without intervals, and whatever they lack reads "–".

LM suites (task "lm", docs/lm_task.md) report held-out NLL per token and per byte (lower is better)
in the same views (own domain, the others', all), and gains as % lower NLL per token than the
local-only control (the same pairing), with the same bootstrap (test records resampled within each
domain; the metric of a resample is sum(nll) / sum(tokens) per client, the gain 1 - method /
control per client, averaged over clients). There is no prior-only control: the LM task has no labels.

Clients with a label_map (conflicting objectives, fedzero.bench.data) store label scores and train
label counts in their own labels, and the run's true labels are the corpus's. Per-record outcomes are
compared in the corpus's labels (`corpus_frame`: a mapped client's score columns permuted back, which
changes no class metric); the prior-only control re-fits each client's prior over the label words it
trained on to the federation's pooled counts of those words, as for every other setting.

CMGA methods get one more table: per round, how many blocks CMGA's aggregate changed against FedAvg's
of the same updates, and by how much (the runs' "cmga_effect", fedzero.bench.methods.cmga_effect);
"–" for runs recorded before it was.

Modules: `summary` (results -> per-setting numbers: levels, gains, controls, budgets, spreads, CMGA's
effect), `tables` (the markdown report), `plots` (the PNGs).
"""

from .plots import plots
from .summary import summarize
from .tables import markdown

__all__ = ["markdown", "plots", "summarize"]
