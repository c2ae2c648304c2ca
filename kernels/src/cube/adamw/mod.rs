//! The AdamW update of one flat f32 tensor (a parameter, or a ZeRO-1 rank's segment of one) as
//! one launch on Burn's CubeCL backend: the parameter, both moments and, on request, the
//! parameter's working copy in another float type (bf16 next to an f32 master) written in one
//! pass, the gradient read in its own float type. Updates in place where the buffers are not
//! shared. Kernel in [`kernels`].

mod kernels;

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Cube, DType, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use super::buffers::{address_type, empty, kernel_dtype, to_dtype};
use crate::adamw::{AdamWHyper, Coefficients, CoefficientsLaunch};

/// `(theta, m, v)` after one update, and `theta` in `working` when asked (see
/// [`crate::adamw_update`], [`crate::adamw_update_with_working`]).
pub(crate) fn adamw_update(
    [theta, grad, m, v]: [Tensor<1>; 4],
    hyper: &AdamWHyper,
    working: Option<DType>,
) -> ([Tensor<1>; 3], Option<Tensor<1>>) {
    let [theta, grad, m, v] = [theta, grad, m, v].map(|t| t.inner().into_dispatch());
    let coefficients = Coefficients::new(hyper);
    match working {
        None => {
            let (theta, m, v) =
                <Dispatch as CubeAdamWBackend>::cube_adamw_update(theta, grad, m, v, coefficients);
            ([theta, m, v].map(Tensor::from_dispatch), None)
        }
        Some(dtype) => {
            let (theta, m, v, working) = <Dispatch as CubeAdamWBackend>::cube_adamw_update_working(
                theta,
                grad,
                m,
                v,
                coefficients,
                dtype,
            );
            (
                [theta, m, v].map(Tensor::from_dispatch),
                Some(Tensor::from_dispatch(working)),
            )
        }
    }
}

#[backend_extension(Cube)]
pub(crate) trait CubeAdamWBackend: Backend {
    fn cube_adamw_update(
        theta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        coefficients: Coefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    fn cube_adamw_update_working(
        theta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        coefficients: Coefficients,
        working: DType,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

impl CubeAdamWBackend for Cube {
    fn cube_adamw_update(
        theta: CubeTensor,
        grad: CubeTensor,
        m: CubeTensor,
        v: CubeTensor,
        coefficients: Coefficients,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let [theta, m, v, _] = update([theta, grad, m, v], coefficients, None);
        (theta, m, v)
    }

    fn cube_adamw_update_working(
        theta: CubeTensor,
        grad: CubeTensor,
        m: CubeTensor,
        v: CubeTensor,
        coefficients: Coefficients,
        working: DType,
    ) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
        let [theta, m, v, working] = update([theta, grad, m, v], coefficients, Some(working));
        (theta, m, v, working)
    }
}

/// `t` contiguous in f32, and where its result goes: `t` itself when no other tensor shares its
/// buffer (the kernel reads each element before writing it), else a new buffer.
fn state_and_output(t: CubeTensor) -> (CubeTensor, CubeTensor) {
    let t = into_contiguous(to_dtype(t, DType::F32));
    let out = match t.can_mut() {
        true => t.clone(),
        false => empty(&t, t.shape(), DType::F32),
    };
    (t, out)
}

/// `[theta, m, v, working]` after one update (the state in f32, then back in its own dtype);
/// `working` is a one-element placeholder unless asked for.
fn update(
    [theta, grad, m, v]: [CubeTensor; 4],
    c: Coefficients,
    working: Option<DType>,
) -> [CubeTensor; 4] {
    let dtypes = [&theta, &m, &v].map(|t| t.dtype);
    let grad_dtype = kernel_dtype(grad.dtype);
    let grad = into_contiguous(to_dtype(grad, grad_dtype));
    let [(theta, theta_out), (m, m_out), (v, v_out)] = [theta, m, v].map(state_and_output);
    let elements = theta.shape().num_elements();
    let working_dtype = working.unwrap_or(DType::F32);
    let working_out = match working {
        Some(_) => empty(&theta, theta.shape(), working_dtype),
        None => empty(&theta, [1], working_dtype),
    };
    if elements > 0 {
        let client = theta.client.clone();
        let cube_dim = CubeDim::new(&client, elements);
        kernels::adamw_update::launch(
            &client,
            calculate_cube_count_elemwise(&client, elements, cube_dim),
            cube_dim,
            address_type(&[&theta, &grad, &working_out]),
            theta.into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            m.into_tensor_arg(),
            v.into_tensor_arg(),
            theta_out.clone().into_tensor_arg(),
            m_out.clone().into_tensor_arg(),
            v_out.clone().into_tensor_arg(),
            working_out.clone().into_tensor_arg(),
            CoefficientsLaunch::new(
                c.grad_scale,
                c.beta1,
                c.one_minus_beta1,
                c.beta2,
                c.one_minus_beta2,
                c.bias1,
                c.bias2,
                c.eps,
                c.keep,
                c.lr,
            ),
            working.is_some(),
            [grad.dtype, working_dtype].map(dtype_to_storage_type),
        );
    }
    let [theta_out, m_out, v_out] = [theta_out, m_out, v_out]
        .into_iter()
        .zip(dtypes)
        .map(|(t, dtype)| to_dtype(t, dtype))
        .collect::<Vec<_>>()
        .try_into()
        .expect("three tensors");
    [theta_out, m_out, v_out, working_out]
}
