"""PyTorch tensors given straight to the NumPy-style API (not through ``fastdistill.torch``).

A model's output requires grad: reading its values must work on every entry point, give the same
numbers as the equivalent NumPy arrays (float64 references), and leave the tensor's autograd state
alone. Tensors the library cannot take (half precision, other devices) get a ``TypeError`` naming the
argument, before any work.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastdistill as fd  # noqa: E402
from fastdistill import functional as Fn  # noqa: E402

from reference import divergence, log_softmax, response_rows  # noqa: E402

IGNORE = -100


def _batch(rows=5, n=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(rows, n, generator=g)).to(dtype).requires_grad_(True)
    t = (3 * torch.randn(rows, n, generator=g)).to(dtype)
    y = torch.randint(0, n, (rows,), generator=g)
    y[1] = IGNORE
    return s, t, y


def _np(x):
    return x.detach().numpy().astype(np.float64)


def _untouched(s, before):
    assert s.requires_grad and s.grad is None and s.grad_fn is None
    assert torch.equal(s.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_that_requires_grad_gives_the_reference_values(dtype):
    s, t, y = _batch(dtype=dtype)
    before = s.detach().clone()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    S, T, Y = _np(s), _np(t), y.numpy()
    keep = Y != IGNORE

    kl = fd.DistilLoss.kl_divergence(2.0)
    ref_rows = divergence("kl_divergence", S, T, 2.0)
    assert kl.compute(s, t) == pytest.approx(ref_rows.mean(), rel=tol)
    rows = kl.compute(s, t, reduction="none")
    assert isinstance(rows, np.ndarray) and rows.dtype == s.detach().numpy().dtype and rows.shape == (5,)
    np.testing.assert_allclose(rows, ref_rows, rtol=tol, atol=tol)

    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.3, 0.7, ignore_index=IGNORE)
    ref, _ = response_rows(S, T, Y, 0.3, 0.7, "kl_divergence", 2.0, ignore_index=IGNORE)
    assert d.loss(s, t, y) == pytest.approx(ref[keep].sum() / keep.sum(), rel=tol)
    loss, grad = d.loss_and_grad(s, t, y)
    assert loss == pytest.approx(ref[keep].sum() / keep.sum(), rel=tol)
    # the gradient against PyTorch autograd on a float64 copy (the input tensor is never differentiated)
    s64 = s.detach().double().requires_grad_(True)
    lq = torch.log_softmax(s64 / 2.0, -1)
    lp = torch.log_softmax(t.double() / 2.0, -1)
    kl_rows = 4.0 * (lp.exp() * (lp - lq)).sum(-1)
    ce_rows = torch.nn.functional.cross_entropy(s64, y, ignore_index=IGNORE, reduction="none")
    ((0.3 * ce_rows + 0.7 * kl_rows) * torch.from_numpy(keep)).sum().div(keep.sum()).backward()
    np.testing.assert_allclose(grad, s64.grad.numpy(), rtol=tol, atol=tol)

    np.testing.assert_allclose(Fn.softmax(s, 2.0), np.exp(log_softmax(S / 2.0)), rtol=tol, atol=tol)
    np.testing.assert_allclose(Fn.log_softmax(s, 2.0), log_softmax(S / 2.0), rtol=tol, atol=tol)
    assert Fn.mse(s, t) == pytest.approx(((S - T) ** 2).mean(), rel=tol)
    _untouched(s, before)


def test_feature_distiller_takes_tensors_that_require_grad():
    s, t, _ = _batch()
    before = s.detach().clone()
    fdist = fd.FeatureDistiller.uniform_mse(2)
    total, grads = fdist.total_loss_and_grads([s, s], [t, t * 0.5])
    S, T = _np(s), _np(t)
    ref = 0.5 * ((S - T) ** 2).mean() + 0.5 * ((S - 0.5 * T) ** 2).mean()
    assert total == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(grads[0], 0.5 * 2 * (S - T) / S.size, rtol=1e-5, atol=1e-8)
    _untouched(s, before)


def test_cpu_tensor_grad_out_is_filled_and_returned():
    s, t, y = _batch(dtype=torch.float64)
    d = fd.ResponseDistiller.balanced()
    loss_ref, grad_ref = d.loss_and_grad(_np(s), _np(t), y.numpy())
    buf = torch.full_like(s.detach(), float("nan"))
    loss, grad = d.loss_and_grad(s, t, y, grad_out=buf)
    assert grad is buf
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    np.testing.assert_allclose(buf.numpy(), grad_ref, rtol=1e-12, atol=1e-15)
    # in place: the student tensor itself receives its gradient
    s2 = s.detach().clone()
    loss2, grad2 = d.loss_and_grad(s2, t, y, grad_out=s2)
    assert grad2 is s2 and loss2 == pytest.approx(loss_ref, rel=1e-12)
    np.testing.assert_allclose(s2.numpy(), grad_ref, rtol=1e-12, atol=1e-15)


def test_grad_out_tensor_checks():
    s, t, y = _batch()
    kl = fd.DistilLoss.kl_divergence(1.0)
    with pytest.raises(fd.DimensionMismatchError,
                       match=r"grad_out shape \(5, 10\) differs from student shape \(5, 11\)"):
        kl.compute_with_grad(s, t, grad_out=torch.empty(5, 10))
    with pytest.raises(TypeError, match="grad_out dtype float64 differs from student dtype float32"):
        kl.compute_with_grad(s, t, grad_out=torch.empty(5, 11, dtype=torch.float64))
    with pytest.raises(fd.InvalidParameterError, match="must not share memory with the teacher"):
        kl.compute_with_grad(s, t, grad_out=t)
    with pytest.raises(fd.InvalidParameterError, match="C-contiguous"):
        kl.compute_with_grad(s, t, grad_out=torch.empty(11, 5).T)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.complex64, torch.int32])
def test_unsupported_tensor_dtypes_name_the_argument(dtype):
    s, t, y = _batch()
    kl = fd.DistilLoss.kl_divergence(1.0)
    accepted = "float32, float64, float16 or bfloat16"
    with pytest.raises(TypeError, match=rf"student must hold {accepted} logits, got dtype {dtype_name(dtype)}"):
        kl.compute(s.to(dtype), t)
    with pytest.raises(TypeError, match=rf"teacher must hold {accepted} logits, got dtype {dtype_name(dtype)}"):
        kl.compute(s, t.to(dtype))
    with pytest.raises(TypeError, match=rf"x must hold {accepted} logits, got dtype {dtype_name(dtype)}"):
        Fn.softmax(s.to(dtype))
    if dtype != torch.int32:
        with pytest.raises(TypeError, match=rf"labels must be an integer array, got dtype {dtype_name(dtype)}"):
            fd.ResponseDistiller.balanced().loss(s, t, y.to(dtype))
    # the contract's order holds: a shape mismatch is reported before the dtype
    with pytest.raises(fd.TeacherStudentMismatchError):
        kl.compute(s.to(dtype), t[:, :3])


def dtype_name(dtype):
    # (float8 is named by NumPy once ml_dtypes registered it, else by PyTorch)
    return {torch.float8_e4m3fn: r"(torch\.)?float8_e4m3fn", torch.complex64: "complex64", torch.int32: "int32"}[dtype]


def test_tensor_on_an_unsupported_device_is_refused_before_work():
    s, t, _ = _batch()
    kl = fd.DistilLoss.kl_divergence(1.0)
    with pytest.raises(TypeError, match="student is a tensor on device 'meta'"):
        kl.compute(s.detach().to("meta"), t)
    with pytest.raises(fd.TeacherStudentMismatchError):  # metadata checks still come first
        kl.compute(s.detach().to("meta"), t[:2])


class _FakeCudaTensor(torch.Tensor):
    """A CPU tensor that reports ``is_cuda``: stands in for a CUDA tensor that requires grad."""

    @property
    def is_cuda(self):  # type: ignore[override]
        return True


def test_cuda_tensor_that_requires_grad_is_routed_by_its_attributes():
    """A CUDA tensor is recognised from ``is_cuda``, without ``__cuda_array_interface__`` (which raises for
    tensors that require grad): 'auto' sends it to the CUDA backend, 'cpu' refuses it by name."""
    s, t, _ = _batch()
    fake = s.detach().as_subclass(_FakeCudaTensor).requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires grad"):
        fake.__cuda_array_interface__  # noqa: B018 - what the façade must not touch
    kl = fd.DistilLoss.kl_divergence(1.0)
    with pytest.raises(fd.InvalidParameterError, match="lives on a CUDA device"):
        kl.compute(fake, t, backend="cpu")
    if "cuda" in fd.available_backends():
        pytest.skip("a real GPU is present: the fake tensor would reach the kernels")
    with pytest.raises(fd.BackendUnavailableError):
        kl.compute(fake, t)
    with pytest.raises(fd.TeacherStudentMismatchError):
        kl.compute(fake, t[:, :3])
