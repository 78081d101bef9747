// wick's CUDA conv epilogue: y = act(y + bias[c] (+ residual)) in place, one
// pass over the convolution's NCHW output (instead of candle's broadcast add,
// residual add and ReLU: three passes and two temporaries).
//
// Regenerate epilogue.ptx with scripts/build-cuda-ptx.sh (nvcc 13.0,
// compute_80 PTX: the driver JIT-compiles it for sm_80 and newer, H100 incl.).

extern "C" __global__ void wick_bias_act_f32(float *y, const float *bias, unsigned long long n,
                                             unsigned int channels, unsigned int plane, int relu) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        unsigned int c = (unsigned int)((i / plane) % channels);
        float v = y[i] + bias[c];
        y[i] = relu ? fmaxf(v, 0.0f) : v;
    }
}

extern "C" __global__ void wick_bias_residual_act_f32(float *y, const float *bias, const float *residual,
                                                      unsigned long long n, unsigned int channels,
                                                      unsigned int plane, int relu) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        unsigned int c = (unsigned int)((i / plane) % channels);
        float v = y[i] + bias[c] + residual[i];
        y[i] = relu ? fmaxf(v, 0.0f) : v;
    }
}
