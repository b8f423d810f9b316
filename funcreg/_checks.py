"""Every user-facing check of funcreg and its message, in one place.

The checks run at the eager boundaries (``fr.grid``, ``fr.stack``, ``fr.sweep``,
``fr.penalty``, ``fr.prox_``, ...), never inside a function that runs under ``vmap``.
Each message names what was passed, the rule, and what to do instead.

The generic checks that several entry points share (``positive_int``, ``check_seed``,
``check_optimizer``, ``check_engine_args``, ...) live here, once; a check that belongs to one
domain keeps its message beside its code. This module imports only :mod:`funcreg.optim`
(for :class:`~funcreg.optim.Optimizer`), which imports nothing from funcreg.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .optim import Optimizer


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` candidates most similar to ``name`` (difflib ratio), best first."""
    cands = list(candidates)
    found = difflib.get_close_matches(name, cands, n=n, cutoff=0.0)
    return found or cands[:n]


def _names(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    if not names:
        return "(none)"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def no_match_error(term: str, selector: Any, names: Iterable[str]) -> ValueError:
    names = list(names)
    pattern = getattr(selector, "pattern_hint", None) or repr(selector)
    near = closest(str(pattern), names)
    return ValueError(
        f"term {term!r}: selector {selector!r} matches no floating-point parameter. "
        f"Closest names: {_names(near)}. Parameters are: {_names(names)}. "
        "Use a glob on the dotted names (e.g. 'hidden.*'), fr.weights() or fr.biases()."
    )


def is_number(value: Any) -> bool:
    """A real number that is not a bool: ``int``, ``float`` and numpy's scalars
    (``np.float32(0.1)``, ``np.int64(3)``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def first_nonfinite(t: Tensor) -> tuple[tuple[int, ...], float] | None:
    """The index and value of the first NaN or inf of a floating (or complex) tensor, in
    row-major order; ``None`` when it has none (or is not floating)."""
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape))
    value = t.reshape(-1)[flat]
    return index, complex(value).real if t.is_complex() else float(value)


def check_finite(where: str, what: str, t: Tensor, fix: str = "clean it first") -> None:
    """No NaN or inf in a floating (or complex) tensor of data or params; the message names
    ``what`` and the first bad element's index."""
    found = first_nonfinite(t)
    if found is not None:
        index, value = found
        raise ValueError(
            f"{where}: {what} contains NaN or inf (first at index {list(index)}: {value}); {fix}"
        )


def check_strength_value(term: str, value: Any) -> None:
    """A strength must be a finite, non-negative number or floating tensor."""
    if not (is_number(value) or isinstance(value, Tensor)):
        raise TypeError(
            f"strength {term!r} must be a number or a floating tensor, got {type(value).__name__}"
        )
    if isinstance(value, Tensor):
        if value.dim() > 1:
            raise ValueError(
                f"strength {term!r} must be a scalar or a 1-d tensor of shape (K,), "
                f"got shape {tuple(value.shape)}"
            )
        if not (value.is_floating_point() or value.dtype in _INT_DTYPES):
            raise TypeError(f"strength {term!r} must be a floating tensor, got {value.dtype}")
        bad = ~torch.isfinite(value.double()) | (value.double() < 0)
        if bool(bad.any()):
            vals = value.reshape(-1)[bad.reshape(-1)].tolist()
            raise ValueError(
                f"strength {term!r} must be finite and >= 0, got {vals[:5]}; "
                "use 0 to switch a term off"
            )
    elif not math.isfinite(value) or value < 0:
        raise ValueError(
            f"strength {term!r} must be finite and >= 0, got {value}; use 0 to switch a term off"
        )


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_strengths(
    spec_terms: Mapping[str, Any], strengths: Mapping[str, Any], *, needs: Iterable[str]
) -> None:
    """All terms in ``needs`` have a strength, every strength is valid, no unknown term names."""
    if not isinstance(strengths, Mapping):
        raise TypeError(
            "strengths must be a dict {term name: strength}, "
            f"got {type(strengths).__name__}; e.g. {{'l1': 1e-3}}"
        )
    for term in needs:
        if term not in strengths:
            raise ValueError(
                f"missing strength for term {term!r}; strengths has {_names(strengths)}. "
                f"Pass e.g. strengths={{{term!r}: 1e-3, ...}}"
            )
    for term, value in strengths.items():
        if term in spec_terms:
            check_strength_value(term, value)


def check_float_params(params: Mapping[str, Any], what: str = "params") -> None:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{what} must be a dict {{name: tensor}} as from fr.params(model), "
            f"got {type(params).__name__}"
        )
    for name, p in params.items():
        if not isinstance(p, Tensor):
            raise TypeError(f"{what}[{name!r}] must be a tensor, got {type(p).__name__}")


def check_keyword(kind: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            raise TypeError(
                f"{kind} got an unexpected keyword {key!r}; "
                f"did you mean {closest(key, allowed, 1)[0]!r}? Allowed: {_names(allowed)}"
            )


def check_toward(term: str, name: str, w: Tensor, ref: Tensor) -> None:
    if tuple(ref.shape) != tuple(w.shape):
        raise ValueError(
            f"term {term!r}: toward= reference for parameter {name!r} has shape "
            f"{tuple(ref.shape)}, but the parameter has shape {tuple(w.shape)}"
        )


def check_toward_names(term: str, ref_names: Iterable[str], selected: Iterable[str]) -> None:
    selected = list(selected)
    missing = [n for n in selected if n not in set(ref_names)]
    if missing:
        raise ValueError(
            f"term {term!r}: toward= has no reference for selected parameter(s) "
            f"{_names(missing)}; it has {_names(ref_names)}"
        )


def check_weight(term: str, name: str, w: Tensor, factor: Tensor, target: tuple[int, ...]) -> None:
    try:
        ok = torch.broadcast_shapes(tuple(factor.shape), target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"term {term!r}: weight= factor for parameter {name!r} has shape "
            f"{tuple(factor.shape)}, which does not broadcast to {target} "
            f"(parameter shape {tuple(w.shape)})"
        )


def check_factor_values(penalty: str, factor: Tensor, where: str = "") -> None:
    """``weight=`` factors are finite and non-negative (checked once, at construction)."""
    if not factor.is_floating_point():
        factor = factor.double()
    if bool((factor < 0).any()) or not bool(torch.isfinite(factor).all()):
        raise ValueError(f"{penalty}: weight= factors{where} must be finite and >= 0")


def check_min_ndim(term: str, penalty: str, name: str, w: Tensor, ndim: int, why: str) -> None:
    if w.dim() < ndim:
        raise ValueError(
            f"term {term!r}: {penalty} needs a parameter with at least {ndim} dimensions "
            f"({why}), but {name!r} has shape {tuple(w.shape)}; select weights only, "
            "e.g. fr.weights() or a name pattern"
        )


# ------------------------------------------------------------ shared argument checks


def positive_int(name: str, value: Any, allow_none: bool = True) -> int | None:
    """``value`` as an ``int >= 1`` (``None`` passes when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_seed(where: str, seed: Any) -> int:
    """A random seed: an ``int >= 0`` (not a bool), returned as ``int``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{where}: seed must be an int >= 0, got {seed!r}")
    return int(seed)


def check_optimizer(where: str, optimizer: Any) -> None:
    """``optimizer`` is a functional optimizer (:class:`funcreg.optim.Optimizer`)."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"{where}: optimizer must be a functional optimizer such as fr.optim.adam(1e-3), "
            f"got {type(optimizer).__name__}"
        )


def check_no_sweep_keywords(where: str, extra: Mapping[str, Any], fn: Any) -> None:
    """Without ``optimizer=``, ``fr.path``/``fr.cross_validate`` solve exactly and hand no
    keyword to ``fr.sweep``: an extra keyword is a misspelling (or a sweep option that
    would do nothing) and is refused, with the closest of ``fn``'s own parameters."""
    if not extra:
        return
    name = next(iter(extra))
    if name == "validation":
        raise TypeError(
            f"{where}: got an unexpected keyword argument 'validation': cross-validation "
            "holds out folds=; for one held-out split pass folds=[(train_idx, val_idx)], or "
            "tune on it with fr.tune(..., validation=(X_val, y_val))"
        )
    own = [p for p in inspect.signature(fn).parameters if p not in ("sweep_kwargs",)]
    near = closest(name, own, 1)
    raise TypeError(
        f"{where}: got an unexpected keyword argument {name!r} (did you mean {near[0]}=?). "
        "Without optimizer= the problem is solved exactly and no keyword goes on to fr.sweep; "
        "fr.sweep's options (batch_size=, compile=, ...) apply with optimizer= and steps="
    )


def tuned_terms(
    where: str, names: Iterable[str], strengths: Mapping[str, Any], terms: Iterable[str] | None
) -> tuple[str, ...]:
    """The terms :func:`funcreg.tune` tunes (``terms``, default every term with a strength,
    ``names``), each with a number as its starting strength, finite and > 0 (strengths are
    tuned in log space); a name outside ``names`` or a missing start is refused."""
    names = tuple(names)
    tuned = names if terms is None else tuple(terms)
    for t in tuned:
        if t not in names:
            raise ValueError(
                f"{where}: cannot tune {t!r}: the spec's terms with a strength are {list(names)}"
            )
    for t in names:
        if t not in strengths:
            raise ValueError(f"{where}: no starting strength for term {t!r}")
    for t in tuned:
        v = strengths[t]
        try:
            x = math.nan if isinstance(v, bool) else float(v)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several
            x = math.nan
        if not x > 0 or not math.isfinite(x):
            raise ValueError(
                f"{where}: the starting strength of {t!r} must be > 0 and finite (it is tuned "
                f"in log space), got {v!r}"
            )
    return tuned


def check_engine_args(where: str, optimizer: Any, steps: Any) -> None:
    """``optimizer=`` and ``steps=`` come together (the sweep engine) or not at all (the
    exact solver)."""
    if (optimizer is None) != (steps is None):
        raise ValueError(
            f"{where}: give optimizer= and steps= together (the sweep engine, for networks), "
            "or neither (exact solutions by fr.solve, for convex problems)"
        )


def no_prox_error(term: str, penalty: str, smooth: bool) -> ValueError:
    """A term whose penalty has no proximal operator was given to a prox step. The rule,
    everywhere: such a term goes through the (sub)gradient, never through a prox."""
    if smooth:
        return ValueError(
            f"term {term!r}: {penalty} has no proximal operator; it goes through the gradient: "
            "add it to the loss (fr.penalty, fr.penalized) and give prox steps only terms that "
            "have one, e.g. spec.nonsmooth()"
        )
    return ValueError(
        f"term {term!r}: {penalty} is non-smooth but has no proximal operator; it goes "
        "through its subgradient: train with prox=False, or in a classic loop add it to the "
        "loss with fr.penalty instead of applying fr.prox_"
    )


# ------------------------------------------------- eager entry points: one model at a time


def check_one_model_strengths(
    where: str, strengths: Mapping[str, Any], terms: Iterable[str], known: Iterable[str]
) -> dict[str, Any]:
    """The strengths of one model at an eager entry point (``fr.penalty``, ``fr.prox_``),
    after :func:`check_strengths`: every key names a term of the spec (``known``: the terms
    of the whole spec, also those split off by ``smooth()``/``nonsmooth()``), and each
    strength of ``terms`` is one number — a number or a 0-dim tensor. Returns the strengths
    with numpy scalars as Python floats (tensors are passed through, never read)."""
    known = list(known)
    for key in strengths:
        if key not in known:
            near = closest(str(key), known, 1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(
                f"{where}: strengths has {key!r}, which names no term of the spec; {hint}"
                f"Terms: {_names(known)}. Fix the name or drop the entry ({where} reads one "
                "strength per term, no optimizer hyperparameters such as 'lr')"
            )
    out = dict(strengths)
    for term in terms:
        if term not in out:
            continue
        value = out[term]
        if isinstance(value, Tensor) and value.dim() > 0:
            raise ValueError(
                f"{where}: strength {term!r} has shape {tuple(value.shape)}, but {where} "
                "takes one model's strengths: a number or a 0-dim tensor (e.g. s[i]). For K "
                "strengths at once use fr.sweep, or torch.func.vmap over fr.penalized"
            )
        if is_number(value) and not isinstance(value, int | float):
            out[term] = float(value)  # numpy scalars: no numpy arithmetic with tensors
    return out


def check_lr(where: str, lr: Any) -> Tensor | float:
    """A learning rate given as a value: a number (numpy scalars too) or a 0-dim floating
    tensor, finite and >= 0. Numbers come back as ``float``, tensors as they are."""
    if isinstance(lr, Tensor):
        if lr.dim() != 0 or not lr.is_floating_point():
            raise ValueError(
                f"{where}: lr must be a number or a 0-dim floating tensor, got a {lr.dtype} "
                f"tensor of shape {tuple(lr.shape)}; pass one model's learning rate"
            )
        value = float(lr)
    elif is_number(lr):
        value = float(lr)
    else:
        raise TypeError(
            f"{where}: lr must be a number >= 0 (or a 0-dim tensor), got {type(lr).__name__} "
            f"{lr!r:.60}"
        )
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}: lr must be a number >= 0, got {value!r}")
    return lr if isinstance(lr, Tensor) else value


def _loss_name(loss_fn: Any) -> str:
    """The user's name for a loss function, through wrappers that set ``__wrapped__``
    (``functools.wraps``)."""
    with contextlib.suppress(ValueError):  # ValueError: a cycle of __wrapped__
        loss_fn = inspect.unwrap(loss_fn)
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__


def check_loss_value(loss_fn: Any, value: Any) -> None:
    """What a loss function returned is one loss: a 0-dim tensor (static facts only, so the
    check is free under ``vmap``, ``grad`` and ``torch.compile``)."""
    if isinstance(value, Tensor) and value.dim() == 0:
        return
    name = _loss_name(loss_fn)
    got = (
        f"a tensor of shape {tuple(value.shape)}"
        if isinstance(value, Tensor)
        else f"a {type(value).__name__}"
    )
    pair = isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping)
    hint = (
        "; a loss returning (data loss, {module path: activation}) needs its activity terms "
        'declared: activity={"act": fr.activity.Activity(fr.L1(), "<module path>")}'
        if pair
        else ""
    )
    raise ValueError(
        f"loss_fn {name} returned {got}; it must return a 0-dim tensor computed from its "
        "params argument (e.g. F.mse_loss(functional_call(model, params, (x,)), y)): not "
        f".item() or a float, and reduce a shape-(1,) loss with .sum() or .squeeze(){hint}"
    )


def loss_ignores_params_error(loss_fn: Any) -> ValueError:
    """A loss that does not depend on the params it is given (detached, or computed from the
    module's own weights)."""
    name = _loss_name(loss_fn)
    return ValueError(
        f"loss_fn {name} returned a loss that does not depend on its params argument (it is "
        "detached, or computed with the module's own weights, e.g. net(x) instead of "
        "functional_call(net, params, (x,))); compute it from params so gradients reach them"
    )


def activity_pair(where: str, loss_fn: Any, out: Any) -> tuple[Any, Mapping[str, Any]]:
    """``(data loss, {module path: activation})``: what a loss with activity terms returns."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise TypeError(
            f"{where}: with activity= terms, loss_fn {_loss_name(loss_fn)} must return "
            f"(data loss, {{module path: activation}}), got {type(out).__name__}"
        )
    return out[0], out[1]


def reaches(value: Tensor, leaves: Mapping[str, Tensor]) -> bool:
    """Whether autograd finds a path from at least one of ``leaves`` to ``value`` (the
    graph is kept: the caller may still differentiate ``value``)."""
    if not value.requires_grad:
        return False
    found = torch.autograd.grad(
        value.sum(), list(leaves.values()), allow_unused=True, retain_graph=True
    )
    return any(g is not None for g in found)


def activation_ignores_params_error(where: str, term: str, paths: Iterable[str]) -> ValueError:
    """An activity term whose recorded activation does not depend on the params."""
    path = next(iter(paths))
    return ValueError(
        f"{where}: activity term {term!r} penalizes the output of module {path!r}, but the "
        "activation the loss returned does not depend on its params argument (it is detached, "
        "or computed by calling the module with its own weights instead of "
        f"functional_call(net.get_submodule({path!r}), its params, (x,))); the term would "
        "change nothing. "
        "Compute the activation from params, or record it with fr.activity.collect(net) "
        "inside the functional loss"
    )


def check_activations(
    where: str, terms: Mapping[str, Any], outputs: Mapping[str, Any], leaves: Mapping[str, Tensor]
) -> None:
    """The ``{module path: activation}`` dict a loss returned for activity ``terms`` (each
    with a ``modules`` tuple): every activation a term reads is a tensor (or a list of
    them) that reaches at least one of the params ``leaves``. A missing path is left to the
    term itself, which names it."""
    for term, act in terms.items():
        for path in act.modules:
            if path not in outputs:
                continue
            found = outputs[path]
            items = [found] if isinstance(found, Tensor) else found
            if not isinstance(items, list | tuple) or not all(isinstance(a, Tensor) for a in items):
                raise TypeError(
                    f"{where}: activity term {term!r}: the loss returned a "
                    f"{type(found).__name__} for module {path!r}; return the module's output "
                    "tensor (or a list of its output tensors)"
                )
            if not items or not all(reaches(a, leaves) for a in items):
                raise activation_ignores_params_error(where, term, [path])


# ------------------------------------------ a sweep's loss, on its first batch, before training


def check_loss_signature(
    where: str, role: str, fn: Any, batch: tuple[Tensor, ...], what: str
) -> None:
    """``fn(params, *batch)`` can be called: a loss takes the params dict, then the tensors of
    a batch unpacked. Refuses (naming ``role``, its signature and the batch's shapes) a
    ``(params, batch)`` signature, a dataset passed as a list ``[x, y]`` (read as batches of
    one tensor) and a ``val=`` with fewer tensors than the loss needs."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables: nothing to check
        return
    try:
        sig.bind({}, *batch)
    except TypeError as e:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional = [p for p in sig.parameters.values() if p.kind in kinds]
        needed = [p for p in positional if p.default is inspect.Parameter.empty]
        n = len(batch)
        if len(positional) == 2 and n > 1:
            hint = (
                f"it looks like {role}(params, batch): the batch is unpacked, so write "
                f"{role}(params, x, y), one argument per tensor of the batch"
            )
        elif n < len(needed) - 1 and what == "train":
            hint = (
                "a list train=[x, y] is read as a list of batches of one tensor each: pass "
                "one dataset as a tuple, train=(x, y)"
            )
        elif n < len(needed) - 1:
            hint = f"give {what}= the same tensors as train=, e.g. {what}=(x_val, y_val)"
        else:
            hint = f"make {role} take the params dict and the {n} tensor(s) of a batch"
        shapes = [tuple(t.shape) for t in batch]
        raise ValueError(
            f"{where}: {role} {_loss_name(fn)}{sig} cannot take a {what} batch: it is called "
            f"as {role}(params, *batch) with the {n} tensor(s) of each {what} batch {shapes} "
            f"({e}); {hint}"
        ) from None


def check_loss_on_batch(
    where: str,
    loss_fn: Any,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batch: tuple[Tensor, ...],
    activity: Mapping[str, Any] | None = None,
) -> None:
    """One model's loss on the first training batch, computed once with autograd before a
    sweep trains: it must be a 0-dim tensor (:func:`check_loss_value`: not ``.item()``, not
    shape ``(1,)``), must not broadcast its target against the output (torch's "target
    size" warning, turned into an error), and must *reach* the params it is given.

    The last rule is structural, not numerical: the loss passes when autograd finds a path
    from at least one parameter to it, even if every gradient is zero there (zero init,
    dead ReLUs). It is refused when no parameter is in its graph: a detached loss, or one
    computed with the module's own weights (``net(x)`` instead of
    ``functional_call(net, params, (x,))``), which would train nothing, silently. It is the
    rule the one-model eager step applies on its first call (``funcreg.train``). Nothing is
    checked for a non-finite loss (divergence is reported per model). The RNG state and the
    buffers are left as they were (dropout draws in a forked RNG; buffers are copies).

    With ``activity`` terms the loss returns ``(data loss, {module path: activation})``: the
    data loss is checked as above and each activation a term reads must reach the params
    too (:func:`check_activations`), or the term would penalize a constant."""
    devices = sorted({t.device.index or 0 for t in params.values() if t.device.type == "cuda"})
    with (
        torch.random.fork_rng(devices=devices),
        warnings.catch_warnings(record=True) as caught,
        torch.enable_grad(),
    ):
        warnings.simplefilter("always")
        leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        value = loss_fn({**leaves, **{n: b.clone() for n, b in buffers.items()}}, *batch)
        if activity:
            value, outputs = activity_pair(where, loss_fn, value)
        check_loss_value(loss_fn, value)
        broadcast = [w for w in caught if "target size" in str(w.message)]
        used = reaches(value, leaves)
        if activity and used and not broadcast:  # the data loss's own errors come first
            check_activations(where, activity, outputs, leaves)
    for w in caught:
        if w not in broadcast:  # pass the loss's other warnings on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if broadcast:
        shapes = [tuple(t.shape) for t in batch]
        raise ValueError(
            f"{where}: loss_fn {_loss_name(loss_fn)} broadcasts its target on the first train "
            f"batch {shapes}: {broadcast[0].message} Give the target the shape of the model's "
            "output, e.g. train=(x, y.view(-1, 1)) or y.unsqueeze(1)"
        )
    if bool(torch.isfinite(value.detach()).all()) and not used:
        raise loss_ignores_params_error(loss_fn)
