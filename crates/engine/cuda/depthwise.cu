// wick's CUDA depthwise convolution: one thread per output value of an NCHW
// f32 conv whose groups equal its input channels (each output channel reads
// one input channel: channel oc reads oc / mult). candle's conv2d runs such a
// conv as one im2col + GEMM per group, hundreds of launches per layer in a
// MobileNet; this is one launch.
//
// Regenerate depthwise.ptx with scripts/build-cuda-ptx.sh (nvcc 13.0,
// compute_80 PTX: the driver JIT-compiles it for sm_80 and newer, H100 incl.).

struct DepthwiseGeometry {
    unsigned int channels, mult, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
};

extern "C" __global__ void wick_depthwise_conv2d_f32(const float *x, const float *weight, float *y,
                                                     unsigned long long n, DepthwiseGeometry g) {
    const unsigned long long out_channels = (unsigned long long)g.channels * g.mult;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        const unsigned long long ox = i % g.ow;
        unsigned long long t = i / g.ow;
        const unsigned long long oy = t % g.oh;
        t /= g.oh;
        const unsigned long long oc = t % out_channels;
        const unsigned long long image = t / out_channels;
        const unsigned long long ic = oc / g.mult;
        const float *plane = x + (image * g.channels + ic) * g.h * g.w;
        const float *taps = weight + oc * g.kh * g.kw;
        float sum = 0.0f;
        for (unsigned int ky = 0; ky < g.kh; ++ky) {
            const long long iy = (long long)(oy * g.sh) + (long long)ky * g.dh - (long long)g.ph;
            if (iy < 0 || iy >= (long long)g.h) continue;
            for (unsigned int kx = 0; kx < g.kw; ++kx) {
                const long long ix = (long long)(ox * g.sw) + (long long)kx * g.dw - (long long)g.pw;
                if (ix < 0 || ix >= (long long)g.w) continue;
                sum = fmaf(plane[iy * g.w + ix], taps[ky * g.kw + kx], sum);
            }
        }
        y[i] = sum;
    }
}
