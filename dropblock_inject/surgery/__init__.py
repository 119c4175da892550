"""FX surgery: find insertion points (``plan``), insert DropBlock (``inject``) and remove it (``strip``).

Two phases with one immutable object between them. The *plan phase* probes the model, traces the scopes,
analyses and selects, and returns a frozen :class:`~.s25_blueprint.Plan`; the *install phase* builds and installs
from it, never tracing again. The files are numbered in the order one ``inject`` runs them, and each imports
only the ones before it:

* :mod:`.s01_registry` -- every class, function and quirk of another library the surgery knows, with its reason;
* :mod:`.s02_wrappers` -- the network inside DataParallel, DDP, ``torch.compile`` or an EMA copy;
* :mod:`.s03_points` -- ``InsertionPoint``, the DropBlock classes inject inserts, the already-injected check;
* :mod:`.s04_outputs` -- a scope's structured output flattened for fx and rebuilt with its exact type;
* :mod:`.s05_globals_of` -- the globals a traced forward sees: a copy owned by the trace, never a patch;
* :mod:`.s06_tracer` -- the fx tracer: one module's own forward, children as leaves, nothing left on it;
* :mod:`.s07_kinds` -- what a module or node is: conv, norm, act, conv-norm unit, residual add, gate;
* :mod:`.s08_example`, :mod:`.s09_metaforward` -- the example forward run cheaply (empty batch, meta device);
* :mod:`.s10_dataflow` -- what ran in it, op by op, with each map's stride and provenance;
* :mod:`.s11_calls` -- how each module was called, and how its traced graph takes those arguments;
* :mod:`.s12_shapes` -- that forward's record: output shapes (strides), call patterns, the dataflow;
* :mod:`.s13_residuals`, :mod:`.s14_normprobe`, :mod:`.s16_roles` -- from the dataflow: residual additions, norms by
  behaviour, and what each map is (backbone, neck or head, attention, dead, its stride);
* :mod:`.s17_checkpointing` -- gradient-checkpointing flags a scope reads, decided per call;
* :mod:`.s18_trace` -- the training-mode fx graph of one module (a *scope*), specialised to how it is called;
* :mod:`.s19_analyze` -- residual additions, shortcut and branch candidates of one traced scope;
* :mod:`.s20_explain` -- why a rule selects nothing, whether a model is a CNN, points never allowed;
* :mod:`.s21_groups` -- the stride group a layer counts in under a stride rule;
* :mod:`.s22_select` -- recipe rules -> scopes -> insertion points;
* :mod:`.s23_sites` -- DropBlock calls inserted into a copy of a traced graph;
* :mod:`.s24_sequentials` -- the top module's points handed to the plain Sequentials it calls, when all lie there;
* :mod:`.s25_blueprint` -- the end of the plan phase: the immutable plan (``plan`` returns its points);
* :mod:`.s26_forward` -- the install phase's runtime: the forward installed on a rewritten module, its record;
* :mod:`.s27_roottrace` -- a training-mode fx trace of a rewritten module as the root, refused clearly;
* :mod:`.s28_rewrite` -- the install phase (``inject``), and ``strip``.
"""

from .s03_points import InsertionPoint, injected_dropblocks
from .s01_registry import register
from .s28_rewrite import inject, strip
from .s25_blueprint import plan
from .s03_points import format_plan
from ..errors import SurgeryError

__all__ = ["InsertionPoint", "SurgeryError", "format_plan", "inject", "injected_dropblocks", "plan", "register",
           "strip"]
