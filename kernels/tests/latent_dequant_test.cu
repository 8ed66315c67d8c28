// CPU check of kernels/src/latent_dequant.cuh: the half2 dequantization of packed codes equals,
// bit for bit, the f32 path the decode kernel takes otherwise (and the CPU codec computes),
// (2^23 + code) − (2^23 + zero) in f32, times the f16 scale in f32, rounded to f16.
// Every zero the half2 path accepts, every code at every position of a word, scales from the
// smallest subnormal to the largest finite f16. Built and run by scripts/kernels-check.sh.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../src/latent_dequant.cuh"

using namespace palu::dequant;

static unsigned short reference(unsigned code, int zero, unsigned short scale_bits) {
    float code_f, scale;
    const unsigned biased = code | 0x4B000000u;  // 2^23 + code, as the kernel forms it
    std::memcpy(&code_f, &biased, 4);
    __half_raw sr;
    sr.x = scale_bits;
    scale = __half2float(__half(sr));
    const float zero_f = 8388608.f + (float)(short)zero;
    const __half_raw h = __float2half_rn((code_f - zero_f) * scale);
    return h.x;
}

// Words that hold every code at every position: word k has code (k + i) mod 2^BITS at position i.
template <int BITS>
static std::vector<unsigned> all_code_words() {
    constexpr int n = 32 / BITS, codes = 1 << BITS;
    std::vector<unsigned> words;
    for (int k = 0; k < codes; ++k) {
        unsigned w = 0;
        for (int i = 0; i < n; ++i) w |= (unsigned)((k + i) % codes) << (BITS * i);
        words.push_back(w);
    }
    return words;
}

template <int BITS>
static long long check(const std::vector<unsigned short>& scales, long long& compared) {
    constexpr int n = 32 / BITS;
    long long bad = 0;
    const auto words = all_code_words<BITS>();
    for (int zero = -1024; zero <= 1023; ++zero) {
        for (unsigned short s : scales) {
            const RowHalf2 row(s, zero);
            for (unsigned w : words) {
                unsigned out[16 / BITS];
                dequant_word<BITS>(w, row, out);
                for (int i = 0; i < n; ++i) {
                    const unsigned short got = (unsigned short)(out[i / 2] >> (16 * (i % 2)));
                    const unsigned code = (w >> (BITS * i)) & ((1u << BITS) - 1);
                    const unsigned short want = reference(code, zero, s);
                    ++compared;
                    if (got != want && bad++ < 5)
                        std::printf("%d-bit: code %u at %d, zero %d, scale 0x%04x: got 0x%04x, want 0x%04x\n", BITS, code, i, zero,
                                    s, got, want);
                }
            }
        }
    }
    return bad;
}

int main() {
    // Finite non-negative f16 scales: the edges (0, subnormals, the smallest normal, 1, the
    // largest finite) and a stride through the rest; fewer for 8-bit, which has 16× the words.
    auto scales = [](int stride) {
        std::vector<unsigned short> s = {0x0000, 0x0001, 0x0002, 0x03ff, 0x0400, 0x3c00, 0x3c01, 0x7bff};
        for (unsigned b = 0x0003; b < 0x7bff; b += stride) s.push_back((unsigned short)b);
        return s;
    };
    long long compared = 0, bad = 0;
    bad += check<2>(scales(97), compared);
    bad += check<4>(scales(97), compared);
    bad += check<8>(scales(1499), compared);
    const bool edges = fits_half2_dequant(-1024) && fits_half2_dequant(1023) && !fits_half2_dequant(-1025) &&
                       !fits_half2_dequant(1024);
    std::printf("latent_dequant: %lld values compared, %lld differ from the f32 path; zero range edges %s\n", compared, bad,
                edges ? "ok" : "WRONG");
    return bad == 0 && edges ? 0 : 1;
}
