//! One Rust buffer given to an ONNX Runtime run as both an input and that run's preallocated
//! output, so that a graph node of the form `out = acc + x` updates the buffer in place (the
//! joint graph's gradient accumulators, `bundle::GradAccumulation`).
//!
//! `ort` makes borrowed inputs easily but takes preallocated outputs only as owned values; the
//! output here is an `OrtValue` over the same memory made through the C API. It does not own the
//! memory: releasing it leaves the buffer to its Vec.

use std::ffi::{c_void, CStr};
use std::ptr::{self, NonNull};

use ort::memory::{Allocator, MemoryInfo};
use ort::value::{DynValue, Shape, TensorRefMut};
use ort::AsPointer;

/// The input view and the output value of one buffer, both over its memory.
pub struct InPlace<'a> {
    pub input: TensorRefMut<'a, f32>,
    pub output: DynValue,
}

/// Views `buffer` (`shape`'s elements, float32) as an input and a preallocated output.
///
/// # Safety
/// The output value must be dropped before `buffer` is used or freed again (the input view
/// borrows it; the output, an owned value, cannot), and both must go to the same run.
pub unsafe fn in_place<'a>(buffer: &'a mut [f32], shape: &[i64]) -> Result<InPlace<'a>, String> {
    let elements: i64 = shape.iter().product();
    if elements < 0 || elements as usize != buffer.len() {
        return Err(format!(
            "buffer of {} values for shape {shape:?}",
            buffer.len()
        ));
    }
    let data = buffer.as_mut_ptr().cast::<c_void>();
    let info = MemoryInfo::default();
    let input = unsafe { TensorRefMut::from_raw(info.clone(), data, Shape::new(shape.to_vec())) }
        .map_err(|e| e.to_string())?;
    let api = ort::api();
    let mut value: *mut ort::sys::OrtValue = ptr::null_mut();
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            info.ptr(),
            data,
            std::mem::size_of_val(buffer),
            shape.as_ptr(),
            shape.len(),
            ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
            &mut value,
        )
    };
    if !status.0.is_null() {
        let message = unsafe { CStr::from_ptr((api.GetErrorMessage)(status.0)) }
            .to_string_lossy()
            .into_owned();
        unsafe { (api.ReleaseStatus)(status.0) };
        return Err(message);
    }
    let value = NonNull::new(value).ok_or("ONNX Runtime returned no value")?;
    // The allocator is only recorded (a tensor over caller memory is never freed by it).
    let output = unsafe { DynValue::from_ptr(value, Some(&Allocator::default())) };
    Ok(InPlace { input, output })
}
