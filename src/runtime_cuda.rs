//! The CUDA execution provider, kept apart from the CPU path: registration fails loudly.
//!
//! This path cannot run on the project's CPU-only machines; it needs the `onnxruntime-gpu`
//! build of libonnxruntime (set `ORT_DYLIB_PATH`) and the CUDA/cuDNN libraries it loads.

use ort::session::builder::SessionBuilder;

/// Registers CUDA device `device_id` on `builder`, erroring instead of falling back to CPU.
pub fn register(builder: SessionBuilder, device_id: i32) -> Result<SessionBuilder, String> {
    let provider = ort::ep::CUDA::default()
        .with_device_id(device_id)
        .build()
        .error_on_failure();
    builder
        .with_execution_providers([provider])
        .map_err(|e| e.to_string())
}
