// Checks csrc/include/bayes_ext/philox.h without libtorch:
// - philox4x32_10 against the Random123 known-answer vectors for Philox4x32-10;
// - philox_block's stream layout from docs/design.md (block in counter words 0-1, offset in
//   words 2-3, seed in the key, all little-word first);
// - radius_uniform / angle_uniform: exact values at the extreme inputs, the radius never 0 or 1,
//   the angle in [0, 1), and every value exact in fp32 (float and double agree bit for bit).
// Exits non-zero and names each failed check.
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "bayes_ext/philox.h"
#include "check.h"

namespace {

using bayes_ext_test::check;

bool same_words(const bayes_ext::PhiloxOut& got, const uint32_t (&want)[4], const char* name) {
  bool ok = true;
  for (int k = 0; k < 4; ++k) ok = ok && got.x[k] == want[k];
  if (!ok) {
    std::printf("  %s: got %08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32
                ", want %08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32 "\n",
                name, got.x[0], got.x[1], got.x[2], got.x[3], want[0], want[1], want[2], want[3]);
  }
  return ok;
}

struct KnownAnswer {
  const char* name;
  uint32_t ctr[4];
  uint32_t key[2];
  uint32_t out[4];
};

// Random123's kat_vectors for philox4x32 with 10 rounds.
const KnownAnswer kKnownAnswers[] = {
    {"zeros", {0u, 0u, 0u, 0u}, {0u, 0u}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {"ones",
     {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {"pi",
     {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};

void test_known_answers() {
  for (const KnownAnswer& v : kKnownAnswers) {
    const bayes_ext::PhiloxOut got =
        bayes_ext::philox4x32_10(v.ctr[0], v.ctr[1], v.ctr[2], v.ctr[3], v.key[0], v.key[1]);
    char what[128];
    std::snprintf(what, sizeof what, "philox4x32_10 known-answer vector '%s'", v.name);
    check(same_words(got, v.out, v.name), what);
  }
}

uint64_t join(uint32_t lo, uint32_t hi) { return static_cast<uint64_t>(hi) << 32 | lo; }

void test_stream_layout() {
  // philox_block(seed, offset, block): counter = (block lo, block hi, offset lo, offset hi),
  // key = (seed lo, seed hi). Each known-answer vector, read back through that layout.
  for (const KnownAnswer& v : kKnownAnswers) {
    const uint64_t block = join(v.ctr[0], v.ctr[1]);
    const uint64_t offset = join(v.ctr[2], v.ctr[3]);
    const uint64_t seed = join(v.key[0], v.key[1]);
    char what[128];
    std::snprintf(what, sizeof what, "philox_block layout (block, offset, seed) for vector '%s'", v.name);
    check(same_words(bayes_ext::philox_block(seed, offset, block), v.out, v.name), what);
  }
  // Each argument lands in its own words: changing one changes the output, and the same counter
  // and key always give the same words.
  const uint64_t seed = 0x0123456789abcdefull, offset = 1, block = 7;
  const bayes_ext::PhiloxOut base = bayes_ext::philox_block(seed, offset, block);
  const bayes_ext::PhiloxOut direct =
      bayes_ext::philox4x32_10(7u, 0u, 1u, 0u, 0x89abcdefu, 0x01234567u);
  bool same = true;
  for (int k = 0; k < 4; ++k) same = same && base.x[k] == direct.x[k];
  check(same, "philox_block(seed, offset, block) == philox4x32_10(block, 0, offset, 0, seed lo, seed hi)");
  const bayes_ext::PhiloxOut high_block = bayes_ext::philox_block(seed, offset, block | (1ull << 32));
  const bayes_ext::PhiloxOut high_direct =
      bayes_ext::philox4x32_10(7u, 1u, 1u, 0u, 0x89abcdefu, 0x01234567u);
  same = true;
  for (int k = 0; k < 4; ++k) same = same && high_block.x[k] == high_direct.x[k];
  check(same, "block >> 32 goes to counter word 1");
  const bayes_ext::PhiloxOut high_offset = bayes_ext::philox_block(seed, offset | (1ull << 32), block);
  const bayes_ext::PhiloxOut high_offset_direct =
      bayes_ext::philox4x32_10(7u, 0u, 1u, 1u, 0x89abcdefu, 0x01234567u);
  same = true;
  for (int k = 0; k < 4; ++k) same = same && high_offset.x[k] == high_offset_direct.x[k];
  check(same, "offset >> 32 goes to counter word 3");
  // Weight (offset 0) and bias (offset 1) streams differ.
  const bayes_ext::PhiloxOut w = bayes_ext::philox_block(seed, 0, 0);
  const bayes_ext::PhiloxOut b = bayes_ext::philox_block(seed, 1, 0);
  bool differ = false;
  for (int k = 0; k < 4; ++k) differ = differ || w.x[k] != b.x[k];
  check(differ, "offset 0 and offset 1 give different words");
}

void test_uniforms() {
  const double ulp24 = 5.9604644775390625e-08;  // 2^-24
  // Exact values at the extreme inputs, in float and double.
  check(bayes_ext::radius_uniform<float>(0u) == static_cast<float>(ulp24), "radius_uniform<float>(0) == 2^-24");
  check(bayes_ext::radius_uniform<double>(0u) == ulp24, "radius_uniform<double>(0) == 2^-24");
  check(bayes_ext::radius_uniform<float>(0xffffffffu) == static_cast<float>(1.0 - ulp24),
        "radius_uniform<float>(0xffffffff) == 1 - 2^-24");
  check(bayes_ext::radius_uniform<double>(0xffffffffu) == 1.0 - ulp24,
        "radius_uniform<double>(0xffffffff) == 1 - 2^-24");
  check(bayes_ext::angle_uniform<float>(0u) == 0.0f, "angle_uniform<float>(0) == 0");
  check(bayes_ext::angle_uniform<double>(0u) == 0.0, "angle_uniform<double>(0) == 0");
  check(bayes_ext::angle_uniform<float>(0xffffffffu) == static_cast<float>(1.0 - ulp24),
        "angle_uniform<float>(0xffffffff) == 1 - 2^-24");
  check(bayes_ext::angle_uniform<double>(0xffffffffu) == 1.0 - ulp24,
        "angle_uniform<double>(0xffffffff) == 1 - 2^-24");
  // The low bits are dropped: 9 for the radius, 8 for the angle.
  check(bayes_ext::radius_uniform<double>(0x1ffu) == ulp24, "radius_uniform ignores the low 9 bits");
  check(bayes_ext::radius_uniform<double>(0x200u) == 3 * ulp24, "radius_uniform(0x200) == 3 * 2^-24");
  check(bayes_ext::angle_uniform<double>(0xffu) == 0.0, "angle_uniform ignores the low 8 bits");
  check(bayes_ext::angle_uniform<double>(0x100u) == ulp24, "angle_uniform(0x100) == 2^-24");

  // Every distinct value: the radius is an odd multiple of 2^-24 in (0, 1), the angle a multiple
  // of 2^-24 in [0, 1), and fp32 holds each exactly.
  bool radius_ok = true, radius_exact = true, radius_log_ok = true;
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const uint32_t x = (k << 9) | (k & 0x1ffu);
    const double u = bayes_ext::radius_uniform<double>(x);
    const float uf = bayes_ext::radius_uniform<float>(x);
    radius_ok = radius_ok && u > 0.0 && u < 1.0 && u == (2.0 * k + 1.0) * ulp24;
    radius_exact = radius_exact && static_cast<double>(uf) == u;
    radius_log_ok = radius_log_ok && std::isfinite(std::log(uf)) && std::log(uf) < 0.0f;
  }
  check(radius_ok, "radius_uniform(x) == (2 * (x >> 9) + 1) * 2^-24, in (0, 1) for every x >> 9");
  check(radius_exact, "radius_uniform<float> is exact (equals the double value) for every x >> 9");
  check(radius_log_ok, "log(radius_uniform<float>) is finite and negative for every x >> 9");
  bool angle_ok = true, angle_exact = true;
  for (uint32_t k = 0; k < (1u << 24); ++k) {
    const uint32_t x = (k << 8) | (k & 0xffu);
    const double v = bayes_ext::angle_uniform<double>(x);
    const float vf = bayes_ext::angle_uniform<float>(x);
    angle_ok = angle_ok && v >= 0.0 && v < 1.0 && v == k * ulp24;
    angle_exact = angle_exact && static_cast<double>(vf) == v;
  }
  check(angle_ok, "angle_uniform(x) == (x >> 8) * 2^-24, in [0, 1) for every x >> 8");
  check(angle_exact, "angle_uniform<float> is exact (equals the double value) for every x >> 8");

  // The largest |eps| the design allows: sqrt(-2 ln 2^-24) = sqrt(48 ln 2) ~ 5.77.
  const double r_max = std::sqrt(-2.0 * std::log(bayes_ext::radius_uniform<double>(0u)));
  check(std::fabs(r_max - std::sqrt(48.0 * std::log(2.0))) < 1e-12, "max Box-Muller radius is sqrt(48 ln 2)");
}

}  // namespace

int main() {
  test_known_answers();
  test_stream_layout();
  test_uniforms();
  return bayes_ext_test::finish("test_philox");
}
