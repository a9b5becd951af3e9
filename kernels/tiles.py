"""Tile kernels: multi-tensor kernels over 2-D tiles of whole tensors, for the optimizers whose
update needs per-tensor reductions or matrix work, which the element-wise skeleton cannot
express: Adafactor (row and column sums, per-tensor norms) and Muon (momentum into the
Newton-Schulz batches, and the orthogonalised update).

Every tensor of a bucket is seen as a stack of ``B`` row-major matrices of ``R x C`` (a vector
is one ``1 x n`` matrix), and one launch covers every tile of ``TILE_ROWS x TILE_COLS`` of every
matrix of every tensor: the grid is the bucket's tile work list (:func:`tile_work`), rows of
``(tensor, matrix, first row, first column)``, so the launch count per step does not depend on
the number of tensors. Each tensor's addresses and sizes are a column of an int64 device table
(``table[column * num_tensors + tensor]``, the columns named below), its group's
hyperparameters a row of the float64 table of :mod:`fusedopt.runners`.

Reductions (sums of squares by row, by column, per tensor) are accumulated with atomic adds
into a zeroed opmath scratch; a later launch reads them. Math runs in fp32 (fp64 for fp64
storage), and values are rounded to the storage dtype where torch.optim rounds them, so that
bf16 and fp16 follow torch's result and not a more precise one. AMP's ``found_inf`` skips
every launch on the device; its ``1/grad_scale`` and the clip coefficient multiply the grads.
"""

import torch
import triton
import triton.language as tl

from fusedopt.kernels import skeleton
from fusedopt.kernels.skeleton import _TL_DTYPES, _amp, _to_storage

TILE_ROWS = 32
TILE_COLS = 32
NUM_WARPS = 4

#: the table columns of each kind of tile kernel, in order
ADAFACTOR_COLUMNS = ("PARAM", "GRAD", "ROWS", "COLS", "GROUP", "ROW_VAR", "COL_VAR", "STEP",
                     "ROW_SUMS", "COL_SUMS", "MEANS")
MUON_COLUMNS = ("PARAM", "GRAD", "ROWS", "COLS", "GROUP", "BUF", "X_IN", "X_OUT", "SLOT",
                "TRANSPOSED")


def tile_work(shapes: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """The tiles of matrices of ``(B, R, C)``: ``int32[num_tiles, 4]`` rows of (tensor,
    matrix, first row, first column). A tensor without elements still gets one tile, so that
    the once-per-tensor work (advancing ``step``) happens for it."""
    rows = []
    for k, (b, r, c) in enumerate(shapes):
        grid = torch.cartesian_prod(
            torch.arange(max(b, 1)), torch.arange(0, max(r, 1), TILE_ROWS),
            torch.arange(0, max(c, 1), TILE_COLS)).reshape(-1, 3)
        rows.append(torch.cat([torch.full((len(grid), 1), k), grid], dim=1))
    work = torch.cat(rows).to(torch.int32) if rows else torch.zeros(0, 4, dtype=torch.int32)
    return work.contiguous().to(device, non_blocking=True)


def count_launches(n: int = 1) -> None:
    """Tile launches count with the skeleton's (``fusedopt.kernels.launch_count()``)."""
    skeleton._launches += n


# ---- pieces ------------------------------------------------------------------------------------


@triton.jit
def _round(x, STORAGE: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr):
    """``x`` rounded to the storage dtype and back: where torch stores an intermediate."""
    return _to_storage(x, STORAGE, ROUND_BF16_BY_HAND).to(COMPUTE)


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula, exact for weights near 0 and near 1."""
    return tl.where(weight < 0.5, start + weight * (end - start),
                    end - (end - start) * (1.0 - weight))


@triton.jit
def _tile(tensors, num_tensors, work):
    """This program's tile: (tensor, matrix, rows, columns) and the matrix's R and C."""
    pid = tl.program_id(0)
    t = tl.load(work + 4 * pid).to(tl.int64)
    b = tl.load(work + 4 * pid + 1).to(tl.int64)
    r0 = tl.load(work + 4 * pid + 2).to(tl.int64)
    c0 = tl.load(work + 4 * pid + 3).to(tl.int64)
    num_rows = tl.load(tensors + 2 * num_tensors + t)
    num_cols = tl.load(tensors + 3 * num_tensors + t)
    return t, b, r0, c0, num_rows, num_cols


@triton.jit
def _column(tensors, num_tensors, t, COLUMN: tl.constexpr):
    return tl.load(tensors + COLUMN * num_tensors + t)


@triton.jit
def _pointer(tensors, num_tensors, t, COLUMN: tl.constexpr, DTYPE: tl.constexpr):
    return tl.load(tensors + COLUMN * num_tensors + t).to(tl.pointer_type(DTYPE))


# ---- Adafactor ---------------------------------------------------------------------------------
# Four launches: sums (row/column sums of g^2, ||theta||^2), factors (row_var, col_var and
# their row means), norm (||U||^2), apply (theta, variance, step). ``acc``: the opmath scratch,
# zeroed before the first: [0, n) ||theta||^2, [n, 2n) ||U||^2, [2n, 3n) this step's number,
# then every matrix's row sums, column sums and row-factor sums at the offsets in the table.


@triton.jit
def _adafactor_hyper(hyper, hyper_stride, group):
    row = hyper + group * hyper_stride
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5))


@triton.jit
def _adafactor_update(tensors, num_tensors, work, hyper, hyper_stride, acc, scaling,
                      FACTORED: tl.constexpr, MAXIMIZE: tl.constexpr, STORAGE: tl.constexpr,
                      COMPUTE: tl.constexpr, SCALE_GRADS: tl.constexpr,
                      ROUND_BF16_BY_HAND: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """This tile's U = g / sqrt(max(V, eps1^2)), as torch rounds it, with what apply needs."""
    t, b, r0, c0, num_rows, num_cols = _tile(tensors, num_tensors, work)
    rows = r0 + tl.arange(0, TR)
    cols = c0 + tl.arange(0, TC)
    mask = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
    offs = (b * num_rows + rows)[:, None] * num_cols + cols[None, :]
    group = _column(tensors, num_tensors, t, 4)
    lr, beta2_decay, eps1, eps2, d, weight_decay = _adafactor_hyper(hyper, hyper_stride, group)
    step = tl.load(acc + 2 * num_tensors + t).to(tl.float64)
    grad = _pointer(tensors, num_tensors, t, 1, STORAGE)
    g = tl.load(grad + offs, mask=mask, other=0.0).to(COMPUTE)
    if SCALE_GRADS:  # GradScaler's unscale (and the clip) writes the grads in their dtype
        g = _round(g * scaling, STORAGE, COMPUTE, ROUND_BF16_BY_HAND)
    if MAXIMIZE:
        g = -g
    eps1_c = eps1.to(COMPUTE)
    if FACTORED:
        row_var = _pointer(tensors, num_tensors, t, 5, STORAGE)
        col_var = _pointer(tensors, num_tensors, t, 6, STORAGE)
        r = tl.load(row_var + b * num_rows + rows, mask=rows < num_rows, other=0.0)
        c = tl.load(col_var + b * num_cols + cols, mask=cols < num_cols, other=0.0)
        means = _column(tensors, num_tensors, t, 10)
        mean = _round(tl.load(acc + means + b) / num_rows, STORAGE, COMPUTE,
                      ROUND_BF16_BY_HAND)
        outer = _round(r.to(COMPUTE)[:, None] * c.to(COMPUTE)[None, :], STORAGE, COMPUTE,
                       ROUND_BF16_BY_HAND)
        estimate = _round(outer / tl.maximum(mean, eps1_c), STORAGE, COMPUTE,
                          ROUND_BF16_BY_HAND)
        variance_new = estimate  # (unused: the factors were written by their launch)
    else:
        variance = _pointer(tensors, num_tensors, t, 5, STORAGE)
        v = tl.load(variance + offs, mask=mask, other=0.0).to(COMPUTE)
        weight = tl.exp(beta2_decay * tl.log(step)).to(COMPUTE)
        square = _round(g * g, STORAGE, COMPUTE, ROUND_BF16_BY_HAND)
        variance_new = _round(_lerp(v, square, weight), STORAGE, COMPUTE, ROUND_BF16_BY_HAND)
        estimate = variance_new
    floor = (eps1 * eps1).to(COMPUTE)
    inverse = _round(1.0 / tl.sqrt(tl.maximum(estimate, floor)), STORAGE, COMPUTE,
                     ROUND_BF16_BY_HAND)
    u = _round(inverse * g, STORAGE, COMPUTE, ROUND_BF16_BY_HAND)
    return t, b, r0, c0, offs, mask, u, variance_new, step, lr, eps2, d, weight_decay


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def adafactor_sums(tensors, num_tensors, work, hyper, hyper_stride, acc, grad_scale,
                   found_inf, clip_coef, FACTORED: tl.constexpr, UNSCALE: tl.constexpr,
                   SKIP_ON_INF: tl.constexpr, CLIP: tl.constexpr, STORAGE: tl.constexpr,
                   COMPUTE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
                   TR: tl.constexpr, TC: tl.constexpr):
    """Launch 1: ||theta||^2 per tensor, sum_c g^2 per row and sum_r g^2 per column per matrix
    (factored), and this step's number (the stored step + 1) for the later launches."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        t, b, r0, c0, num_rows, num_cols = _tile(tensors, num_tensors, work)
        rows = r0 + tl.arange(0, TR)
        cols = c0 + tl.arange(0, TC)
        mask = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
        offs = (b * num_rows + rows)[:, None] * num_cols + cols[None, :]
        param = _pointer(tensors, num_tensors, t, 0, STORAGE)
        p = tl.load(param + offs, mask=mask, other=0.0).to(COMPUTE)
        tl.atomic_add(acc + t, tl.sum(tl.sum(p * p, 1), 0))
        if FACTORED:
            grad = _pointer(tensors, num_tensors, t, 1, STORAGE)
            g = tl.load(grad + offs, mask=mask, other=0.0).to(COMPUTE)
            if UNSCALE or CLIP:
                g = _round(g * scaling, STORAGE, COMPUTE, ROUND_BF16_BY_HAND)
            square = g * g
            row_sums = _column(tensors, num_tensors, t, 8)
            col_sums = _column(tensors, num_tensors, t, 9)
            tl.atomic_add(acc + row_sums + b * num_rows + rows, tl.sum(square, 1),
                          mask=rows < num_rows)
            tl.atomic_add(acc + col_sums + b * num_cols + cols, tl.sum(square, 0),
                          mask=cols < num_cols)
        if (b == 0) & (r0 == 0) & (c0 == 0):
            step = _pointer(tensors, num_tensors, t, 7, tl.float32)
            tl.store(acc + 2 * num_tensors + t, (tl.load(step) + 1.0).to(COMPUTE))


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def adafactor_factors(tensors, num_tensors, work, hyper, hyper_stride, acc, grad_scale,
                      found_inf, clip_coef, UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr,
                      CLIP: tl.constexpr, STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                      ROUND_BF16_BY_HAND: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """Launch 2 (factored tensors): row_var and col_var lerped towards the row and column
    means of g^2 (the tiles of the first column block own the rows, those of the first row
    block the columns), and the sum of the new row factors per matrix."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        t, b, r0, c0, num_rows, num_cols = _tile(tensors, num_tensors, work)
        group = _column(tensors, num_tensors, t, 4)
        beta2_decay = tl.load(hyper + group * hyper_stride + 1)
        step = tl.load(acc + 2 * num_tensors + t).to(tl.float64)
        weight = tl.exp(beta2_decay * tl.log(step)).to(COMPUTE)
        if c0 == 0:  # row factors: each the mean of g^2 over the C columns
            rows = r0 + tl.arange(0, TR)
            new = _new_factor(tensors, num_tensors, t, acc, b * num_rows + rows,
                              rows < num_rows, num_cols, weight, 5, 8, STORAGE, COMPUTE,
                              ROUND_BF16_BY_HAND)
            means = _column(tensors, num_tensors, t, 10)
            tl.atomic_add(acc + means + b, tl.sum(tl.where(rows < num_rows,
                                                           new.to(COMPUTE), 0.0), 0))
        if r0 == 0:  # column factors: each the mean of g^2 over the R rows
            cols = c0 + tl.arange(0, TC)
            _new_factor(tensors, num_tensors, t, acc, b * num_cols + cols, cols < num_cols,
                        num_rows, weight, 6, 9, STORAGE, COMPUTE, ROUND_BF16_BY_HAND)


@triton.jit
def _new_factor(tensors, num_tensors, t, acc, index, inside, count, weight,
                FACTOR: tl.constexpr, SUMS: tl.constexpr, STORAGE: tl.constexpr,
                COMPUTE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr):
    """Factors ``index`` (of column FACTOR, their sums of g^2 at column SUMS of the table)
    lerped towards sum / count, stored and returned as stored. torch takes ||g|| over the
    row (column), squares it, divides by the count, each in the param's dtype."""
    factor = _pointer(tensors, num_tensors, t, FACTOR, STORAGE) + index
    sums = tl.load(acc + _column(tensors, num_tensors, t, SUMS) + index, mask=inside,
                   other=0.0)
    norm = _round(tl.sqrt(sums), STORAGE, COMPUTE, ROUND_BF16_BY_HAND)
    mean = _round(_round(norm * norm, STORAGE, COMPUTE, ROUND_BF16_BY_HAND) / count,
                  STORAGE, COMPUTE, ROUND_BF16_BY_HAND)
    old = tl.load(factor, mask=inside, other=0.0).to(COMPUTE)
    new = _to_storage(_lerp(old, mean, weight), STORAGE, ROUND_BF16_BY_HAND)
    tl.store(factor, new, mask=inside)
    return new


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def adafactor_norms(tensors, num_tensors, work, hyper, hyper_stride, acc, grad_scale,
                    found_inf, clip_coef, FACTORED: tl.constexpr, MAXIMIZE: tl.constexpr,
                    UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr, CLIP: tl.constexpr,
                    STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                    ROUND_BF16_BY_HAND: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """Launch 3: ||U||^2 per tensor."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        t, b, r0, c0, offs, mask, u, variance_new, step, lr, eps2, d, weight_decay = \
            _adafactor_update(tensors, num_tensors, work, hyper, hyper_stride, acc, scaling,
                              FACTORED, MAXIMIZE, STORAGE, COMPUTE, UNSCALE or CLIP,
                              ROUND_BF16_BY_HAND, TR, TC)
        tl.atomic_add(acc + num_tensors + t, tl.sum(tl.sum(tl.where(mask, u * u, 0.0), 1), 0))


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def adafactor_apply(tensors, num_tensors, work, hyper, hyper_stride, acc, numels, grad_scale,
                    found_inf, clip_coef, FACTORED: tl.constexpr, MAXIMIZE: tl.constexpr,
                    UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr, CLIP: tl.constexpr,
                    STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                    ROUND_BF16_BY_HAND: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """Launch 4: theta <- theta (1 - lr wd) - alpha / max(1, RMS(U) / d) U, with
    alpha = max(eps2, RMS(theta)) min(lr, 1/sqrt(t)); the new variance (vectors) and step."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        t, b, r0, c0, offs, mask, u, variance_new, step, lr, eps2, d, weight_decay = \
            _adafactor_update(tensors, num_tensors, work, hyper, hyper_stride, acc, scaling,
                              FACTORED, MAXIMIZE, STORAGE, COMPUTE, UNSCALE or CLIP,
                              ROUND_BF16_BY_HAND, TR, TC)
        root_numel = tl.sqrt(tl.load(numels + t).to(tl.float64))
        # torch takes both norms in the param's dtype, then works on them in Python floats
        param_norm = _round(tl.sqrt(tl.load(acc + t)), STORAGE, COMPUTE, ROUND_BF16_BY_HAND)
        update_norm = _round(tl.sqrt(tl.load(acc + num_tensors + t)), STORAGE, COMPUTE,
                             ROUND_BF16_BY_HAND)
        rho = tl.minimum(lr, 1.0 / tl.sqrt(step))
        alpha = tl.maximum(eps2, param_norm.to(tl.float64) / root_numel) * rho
        denom = tl.maximum(1.0, update_norm.to(tl.float64) / (root_numel * d))
        param = _pointer(tensors, num_tensors, t, 0, STORAGE)
        p = tl.load(param + offs, mask=mask, other=0.0).to(COMPUTE)
        if weight_decay != 0:
            p = _round(p * (1.0 - lr * weight_decay).to(COMPUTE), STORAGE, COMPUTE,
                       ROUND_BF16_BY_HAND)
        p = p + (-alpha / denom).to(COMPUTE) * u
        tl.store(param + offs, _to_storage(p, STORAGE, ROUND_BF16_BY_HAND), mask=mask)
        if not FACTORED:
            variance = _pointer(tensors, num_tensors, t, 5, STORAGE)
            tl.store(variance + offs, _to_storage(variance_new, STORAGE, ROUND_BF16_BY_HAND),
                     mask=mask)
        if (b == 0) & (r0 == 0) & (c0 == 0):
            tl.store(_pointer(tensors, num_tensors, t, 7, tl.float32), step.to(tl.float32))


# ---- Muon --------------------------------------------------------------------------------------
# Two launches around the batched Newton-Schulz iterations (torch matmuls): momentum, which
# writes each update in bf16 into its slot of its shape's batch (transposed when tall, so every
# batch is of wide matrices) and sums its squares; and apply. ``norms``: float32 per slot.


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def muon_momentum(tensors, num_tensors, work, hyper, hyper_stride, norms, grad_scale,
                  found_inf, clip_coef, NESTEROV: tl.constexpr, UNSCALE: tl.constexpr,
                  SKIP_ON_INF: tl.constexpr, CLIP: tl.constexpr, STORAGE: tl.constexpr,
                  COMPUTE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr, TR: tl.constexpr,
                  TC: tl.constexpr):
    """Launch 1: B <- lerp(B, g, 1 - mu); the update (lerp(g, B, mu), or B) in bf16 into its
    batch slot; the sum of its squares into ``norms``."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        t, b, r0, c0, num_rows, num_cols = _tile(tensors, num_tensors, work)
        rows = r0 + tl.arange(0, TR)
        cols = c0 + tl.arange(0, TC)
        mask = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
        offs = rows[:, None] * num_cols + cols[None, :]
        group = _column(tensors, num_tensors, t, 4)
        momentum = tl.load(hyper + group * hyper_stride + 2)
        g = tl.load(_pointer(tensors, num_tensors, t, 1, STORAGE) + offs, mask=mask,
                    other=0.0).to(COMPUTE)
        if UNSCALE or CLIP:
            g = _round(g * scaling, STORAGE, COMPUTE, ROUND_BF16_BY_HAND)
        buf_ptr = _pointer(tensors, num_tensors, t, 5, STORAGE)
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        buf = _round(_lerp(buf, g, (1.0 - momentum).to(COMPUTE)), STORAGE, COMPUTE,
                     ROUND_BF16_BY_HAND)
        tl.store(buf_ptr + offs, buf.to(STORAGE), mask=mask)
        if NESTEROV:
            update = _round(_lerp(g, buf, momentum.to(COMPUTE)), STORAGE, COMPUTE,
                            ROUND_BF16_BY_HAND)
        else:
            update = buf
        update = _to_storage(update.to(tl.float32), tl.bfloat16, ROUND_BF16_BY_HAND)
        transposed = _column(tensors, num_tensors, t, 9)
        slot_offs = tl.where(transposed != 0, cols[None, :] * num_rows + rows[:, None], offs)
        tl.store(_pointer(tensors, num_tensors, t, 6, tl.bfloat16) + slot_offs, update,
                 mask=mask)
        square = update.to(tl.float32)
        square = tl.where(mask, square * square, 0.0)
        tl.atomic_add(norms + _column(tensors, num_tensors, t, 8), tl.sum(tl.sum(square, 1), 0))


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def muon_apply(tensors, num_tensors, work, hyper, hyper_stride, lr_ratios, clamped_norms,
               grad_scale, found_inf, clip_coef, NORMALISE_BUFFER: tl.constexpr,
               UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr, CLIP: tl.constexpr,
               STORAGE: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
               TR: tl.constexpr, TC: tl.constexpr):
    """Launch 2: theta <- theta (1 - lr wd) - lr' O, O the orthogonalised update of the
    tensor's slot, lr' = lr x its shape's ratio. NORMALISE_BUFFER (bf16 params without
    Nesterov): torch's Newton-Schulz divides its bf16 input in place, which is then the
    momentum buffer itself; so does this launch, to keep torch's trajectory."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        t, b, r0, c0, num_rows, num_cols = _tile(tensors, num_tensors, work)
        rows = r0 + tl.arange(0, TR)
        cols = c0 + tl.arange(0, TC)
        mask = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
        offs = rows[:, None] * num_cols + cols[None, :]
        group = _column(tensors, num_tensors, t, 4)
        lr = tl.load(hyper + group * hyper_stride)
        weight_decay = tl.load(hyper + group * hyper_stride + 1)
        transposed = _column(tensors, num_tensors, t, 9)
        slot_offs = tl.where(transposed != 0, cols[None, :] * num_rows + rows[:, None], offs)
        o = tl.load(_pointer(tensors, num_tensors, t, 7, tl.bfloat16) + slot_offs, mask=mask,
                    other=0.0).to(COMPUTE)
        param = _pointer(tensors, num_tensors, t, 0, STORAGE)
        p = tl.load(param + offs, mask=mask, other=0.0).to(COMPUTE)
        p = _round(p * (1.0 - lr * weight_decay).to(COMPUTE), STORAGE, COMPUTE,
                   ROUND_BF16_BY_HAND)
        p = p + (-(lr * tl.load(lr_ratios + t))).to(COMPUTE) * o
        tl.store(param + offs, _to_storage(p, STORAGE, ROUND_BF16_BY_HAND), mask=mask)
        if NORMALISE_BUFFER:
            buf_ptr = _pointer(tensors, num_tensors, t, 5, STORAGE)
            norm = tl.load(clamped_norms + _column(tensors, num_tensors, t, 8)).to(tl.float32)
            buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(buf_ptr + offs, _to_storage(buf / norm, STORAGE, ROUND_BF16_BY_HAND),
                     mask=mask)


def storage_and_compute(dtype: torch.dtype) -> dict:
    """The dtype constexprs of a tile kernel for ``dtype`` storage."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return {"STORAGE": _TL_DTYPES[dtype], "COMPUTE": _TL_DTYPES[compute]}
