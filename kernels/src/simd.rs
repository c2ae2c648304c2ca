//! Portable SIMD for the CPU kernels. Each kernel is written once, generic over `V: Lanes` (a
//! vector of `V::WIDTH` f32), and instantiated three times: `f32` (portable, any length, any CPU),
//! `avx2::F32x8` (AVX2 + FMA) and `avx512::F32x16` (AVX-512F). [`simd_dispatch!`] picks the
//! widest instance the CPU supports at run time, so the binary needs nothing beyond x86-64's
//! baseline (SSE2) and uses AVX-512 where present. The vector instances are compiled inside
//! `#[target_feature]` functions so that the intrinsics inline. (Plain loops over the state are
//! not reliably auto-vectorized by LLVM: the loads and stores through the state buffer and the
//! exp's bit tricks defeat its SLP vectorizer.)
//!
//! "This CPU has the instructions" is a type: a vector is only built from floats with an
//! [`Isa<V>`], a zero-sized token that only the run-time detection ([`Isa::detect`], called by
//! [`simd_dispatch!`]) makes, so the intrinsics behind a vector run only on a CPU that has them.
//!
//! `ZAMBA_KERNELS_SIMD=scalar|avx2|avx512` caps the level (never above what the CPU has): tests
//! use it to run the narrower paths on a machine with AVX-512, and it shows what the wide
//! vectors buy. The levels round differently (FMA vs separate multiply and add, vector widths
//! change the order of horizontal sums), so results can differ in the last bits between them;
//! at a fixed level every kernel is deterministic.

use std::marker::PhantomData;
use std::ops::{Add, Div, Mul, Sub};
use std::sync::OnceLock;

/// The instruction sets the CPU kernels can use, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable scalar code.
    Scalar,
    /// 8 floats per instruction (AVX2 + FMA).
    Avx2,
    /// 16 floats per instruction (AVX-512F).
    Avx512,
}

impl SimdLevel {
    /// Floats per vector.
    pub fn width(self) -> usize {
        match self {
            Self::Scalar => 1,
            Self::Avx2 => 8,
            Self::Avx512 => 16,
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Self::Scalar),
            "avx2" => Some(Self::Avx2),
            "avx512" => Some(Self::Avx512),
            _ => None,
        }
    }
}

/// Environment variable that caps [`simd_level`].
pub const SIMD_ENV: &str = "ZAMBA_KERNELS_SIMD";

/// The widest level this CPU supports, detected at run time (once per process).
pub fn detected_simd_level() -> SimdLevel {
    static DETECTED: OnceLock<SimdLevel> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
            {
                return SimdLevel::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    })
}

/// The level the kernels use: [`detected_simd_level`], capped by `ZAMBA_KERNELS_SIMD` when set.
/// Read once per process.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detected_simd_level();
        match std::env::var(SIMD_ENV) {
            Ok(value) => match SimdLevel::parse(&value) {
                Some(cap) => cap.min(detected),
                None => {
                    eprintln!(
                        "warning: {SIMD_ENV}={value:?} is not one of scalar, avx2, avx512; using {detected:?}"
                    );
                    detected
                }
            },
            Err(_) => detected,
        }
    })
}

/// The widest level at or below [`simd_level`] whose vector width divides `n` (a kernel whose
/// inner loop runs over exactly `n` floats with no remainder loop).
pub(crate) fn level_dividing(n: usize) -> SimdLevel {
    [SimdLevel::Avx512, SimdLevel::Avx2]
        .into_iter()
        .find(|&level| level <= simd_level() && n.is_multiple_of(level.width()))
        .unwrap_or(SimdLevel::Scalar)
}

/// Proof that this CPU runs the instructions of the vector type `V`: a zero-sized token that only
/// [`Isa::detect`] makes, after asking the CPU. Building a vector from floats takes one
/// ([`Isa::splat`], [`Isa::load`]), and a vector hands out its own ([`Lanes::isa`]: that it exists
/// proves a token was made), so the intrinsics behind [`Lanes`] run only where they exist.
pub(crate) struct Isa<V>(PhantomData<fn() -> V>);

impl<V> Clone for Isa<V> {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Isa<V> {}

impl<V: Lanes> Isa<V> {
    /// The token of `V`, if this CPU has `V::LEVEL`'s instructions.
    pub(crate) fn detect() -> Option<Self> {
        (V::LEVEL <= detected_simd_level()).then_some(Self(PhantomData))
    }

    /// `x` in every lane.
    #[inline(always)]
    pub(crate) fn splat(self, x: f32) -> V {
        V::splat(self, x)
    }

    /// The first `WIDTH` floats of `src`.
    ///
    /// # Panics
    /// If `src` has fewer than `WIDTH` floats.
    #[inline(always)]
    pub(crate) fn load(self, src: &[f32]) -> V {
        let src = &src[..V::WIDTH];
        // SAFETY: `src` has exactly `WIDTH` floats.
        unsafe { V::load_at(self, src, 0) }
    }

    /// `load(&src[i..])` without the bounds check, for hot loops whose bounds are checked once
    /// before the loop (debug builds check every call).
    ///
    /// # Safety
    /// `i + WIDTH <= src.len()`.
    #[inline(always)]
    pub(crate) unsafe fn load_at(self, src: &[f32], i: usize) -> V {
        // SAFETY: the caller's promise.
        unsafe { V::load_at(self, src, i) }
    }
}

/// The token of the scalar instance, which needs nothing beyond the baseline target.
pub(crate) const SCALAR: Isa<f32> = Isa(PhantomData);

/// Declares `fn $name($args) -> $ret` that runs `$generic(isa, $args)` with the token `isa` of
/// the vector type of the level `$level` evaluates to (the generic function's first parameter
/// is an [`Isa<V>`]).
///
/// # Panics
/// If `$level` is above what this CPU has ([`simd_level`] and [`level_dividing`] never are).
macro_rules! simd_dispatch {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?
        = $generic:ident, level = $level:expr) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            let level: $crate::simd::SimdLevel = $level;
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::simd::{Isa, avx2::F32x8, avx512::F32x16};
                #[allow(clippy::too_many_arguments)] // the kernel's, and the token
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512(isa: Isa<F32x16>, $($arg: $ty),*) $(-> $ret)? {
                    $generic(isa, $($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn avx2(isa: Isa<F32x8>, $($arg: $ty),*) $(-> $ret)? {
                    $generic(isa, $($arg),*)
                }
                match level {
                    $crate::simd::SimdLevel::Avx512 => {
                        let isa = $crate::simd::token::<F32x16>(level);
                        // SAFETY: `isa` exists, so this CPU has AVX-512F, AVX2 and FMA.
                        return unsafe { avx512(isa, $($arg),*) };
                    }
                    $crate::simd::SimdLevel::Avx2 => {
                        let isa = $crate::simd::token::<F32x8>(level);
                        // SAFETY: `isa` exists, so this CPU has AVX2 and FMA.
                        return unsafe { avx2(isa, $($arg),*) };
                    }
                    $crate::simd::SimdLevel::Scalar => {}
                }
            }
            let _ = level;
            $generic($crate::simd::SCALAR, $($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// The token of `V` for a dispatch at `level`.
///
/// # Panics
/// If this CPU does not have `V`'s instructions (a level above [`detected_simd_level`]).
#[inline]
pub(crate) fn token<V: Lanes>(level: SimdLevel) -> Isa<V> {
    Isa::detect().unwrap_or_else(|| {
        panic!(
            "SIMD dispatch at {level:?} on a CPU that has only {:?}",
            detected_simd_level()
        )
    })
}

mod sealed {
    /// Only this module's vector types implement [`super::Lanes`]: their tokens are what the
    /// `unsafe` blocks of the instances rely on.
    pub trait Sealed {}
    impl Sealed for f32 {}
    #[cfg(target_arch = "x86_64")]
    impl Sealed for super::avx2::F32x8 {}
    #[cfg(target_arch = "x86_64")]
    impl Sealed for super::avx512::F32x16 {}
}

/// A vector of `WIDTH` f32, built from floats only with an [`Isa`] token of its type.
/// `max`/`min` return `self` when it is NaN, so NaN propagates.
pub(crate) trait Lanes:
    sealed::Sealed
    + Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    const WIDTH: usize;
    /// The instructions the vector's operations use.
    const LEVEL: SimdLevel;
    /// The token of this vector's type: a vector is only made where a token was.
    #[inline(always)]
    fn isa(self) -> Isa<Self> {
        Isa(PhantomData)
    }
    /// `x` in every lane (callers: [`Isa::splat`]).
    fn splat(isa: Isa<Self>, x: f32) -> Self;
    /// Into the first `WIDTH` floats of `dst`.
    ///
    /// # Panics
    /// If `dst` has fewer than `WIDTH` floats.
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        let dst = &mut dst[..Self::WIDTH];
        // SAFETY: `dst` has exactly `WIDTH` floats.
        unsafe { self.store_at(dst, 0) }
    }
    /// `src[i..i + WIDTH]` without the bounds check (callers: [`Isa::load`], [`Isa::load_at`]).
    ///
    /// # Safety
    /// `i + WIDTH <= src.len()`.
    unsafe fn load_at(isa: Isa<Self>, src: &[f32], i: usize) -> Self;
    /// `store(&mut dst[i..])` without the bounds check (debug builds check it).
    ///
    /// # Safety
    /// `i + WIDTH <= dst.len()`.
    unsafe fn store_at(self, dst: &mut [f32], i: usize);
    /// `self * b + c`, fused where the target has FMA.
    fn mul_add(self, b: Self, c: Self) -> Self;
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
    /// `then` in the lanes where `a < b`, `otherwise` elsewhere (also where either is NaN).
    fn select_lt(a: Self, b: Self, then: Self, otherwise: Self) -> Self;
    /// `self · 2^k` for an integer-valued `k` in `[-126, 127]`, given both as `k` and as
    /// `t = k + 1.5·2^23` (`k` in the low mantissa bits of `t`): AVX-512 scales by `k` in one
    /// instruction (`vscalefps`); the others put `k + 127` in the exponent field of `t`'s bits
    /// (`(bits(t) + 127) << 23` is `2^k`) and multiply. Exact wherever the product is.
    fn scale_pow2(self, k: Self, t: Self) -> Self;
    /// `(m, e)` with `self = m · 2^e`, `m` in `[0.5, 1)`, for positive normal `self`.
    fn frexp(self) -> (Self, Self);
    /// Horizontal sum, in a fixed order.
    fn sum(self) -> f32;
    /// The horizontal sums of `WIDTH` vectors at once: lane `i` is the sum of `rows[i]`, in a
    /// fixed order (a transpose-and-add tree: a few shuffles per sum instead of a whole reduction
    /// each).
    fn sums(rows: &[Self]) -> Self;
    /// Horizontal maximum (NaN lanes are not propagated; callers check finiteness separately).
    fn max_lane(self) -> f32;
    fn sqrt(self) -> Self;
}

impl Lanes for f32 {
    const WIDTH: usize = 1;
    const LEVEL: SimdLevel = SimdLevel::Scalar;
    #[inline(always)]
    fn splat(_isa: Isa<Self>, x: f32) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load_at(_isa: Isa<Self>, src: &[f32], i: usize) -> Self {
        debug_assert!(i < src.len());
        // SAFETY: `i < src.len()`, the caller's promise.
        unsafe { *src.get_unchecked(i) }
    }
    #[inline(always)]
    unsafe fn store_at(self, dst: &mut [f32], i: usize) {
        debug_assert!(i < dst.len());
        // SAFETY: `i < dst.len()`, the caller's promise.
        unsafe { *dst.get_unchecked_mut(i) = self }
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        // Without FMA in the baseline target `f32::mul_add` is a call to libm's `fmaf`.
        #[cfg(target_arch = "aarch64")]
        return f32::mul_add(self, b, c);
        #[cfg(not(target_arch = "aarch64"))]
        return self * b + c;
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if self < other { other } else { self }
    }
    #[inline(always)]
    fn min(self, other: Self) -> Self {
        if self > other { other } else { self }
    }
    #[inline(always)]
    fn scale_pow2(self, _k: Self, t: Self) -> Self {
        self * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
    }
    #[inline(always)]
    fn select_lt(a: Self, b: Self, then: Self, otherwise: Self) -> Self {
        if a < b { then } else { otherwise }
    }
    #[inline(always)]
    fn frexp(self) -> (Self, Self) {
        let bits = self.to_bits();
        let m = f32::from_bits((bits & 0x807F_FFFF) | 0x3F00_0000);
        (m, ((bits >> 23) as i32 - 126) as f32)
    }
    #[inline(always)]
    fn sum(self) -> f32 {
        self
    }
    #[inline(always)]
    fn sums(rows: &[Self]) -> Self {
        rows[0]
    }
    #[inline(always)]
    fn max_lane(self) -> f32 {
        self
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

/// AVX2+FMA vectors. Invariant: an [`F32x8`] exists only on a CPU with AVX2 and FMA. It is made
/// from floats by `splat` and `load_at`, which take an `Isa<F32x8>` (made only where the CPU has
/// both), from other `F32x8`s by the operations below, and by [`super::avx512::F32x16`]'s
/// reductions, whose own token required AVX2 and FMA as well.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::{Add, Div, Mul, Sub};

    use super::{Isa, SimdLevel};

    #[derive(Clone, Copy)]
    pub(crate) struct F32x8(pub(super) __m256);

    // SAFETY (every `unsafe` block in this module but `load_at` and `store_at`, which say their
    // own): the intrinsics need AVX2 and FMA, which the module invariant guarantees.
    impl Add for F32x8 {
        type Output = Self;
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Self(_mm256_add_ps(self.0, o.0)) }
        }
    }
    impl Sub for F32x8 {
        type Output = Self;
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { Self(_mm256_sub_ps(self.0, o.0)) }
        }
    }
    impl Mul for F32x8 {
        type Output = Self;
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { Self(_mm256_mul_ps(self.0, o.0)) }
        }
    }
    impl Div for F32x8 {
        type Output = Self;
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { Self(_mm256_div_ps(self.0, o.0)) }
        }
    }

    impl super::Lanes for F32x8 {
        const WIDTH: usize = 8;
        const LEVEL: SimdLevel = SimdLevel::Avx2;
        #[inline(always)]
        fn splat(_isa: Isa<Self>, x: f32) -> Self {
            unsafe { Self(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load_at(_isa: Isa<Self>, src: &[f32], i: usize) -> Self {
            debug_assert!(i + 8 <= src.len());
            // SAFETY: the token proves AVX2; `i + 8 <= src.len()`, the caller's promise.
            unsafe { Self(_mm256_loadu_ps(src.as_ptr().add(i))) }
        }
        #[inline(always)]
        unsafe fn store_at(self, dst: &mut [f32], i: usize) {
            debug_assert!(i + 8 <= dst.len());
            // SAFETY: `self` exists, so the CPU has AVX2; `i + 8 <= dst.len()`, the caller's
            // promise.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(i), self.0) }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { Self(_mm256_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn max(self, other: Self) -> Self {
            // `maxps` returns its second operand when either is NaN.
            unsafe { Self(_mm256_max_ps(other.0, self.0)) }
        }
        #[inline(always)]
        fn min(self, other: Self) -> Self {
            unsafe { Self(_mm256_min_ps(other.0, self.0)) }
        }
        #[inline(always)]
        fn scale_pow2(self, _k: Self, t: Self) -> Self {
            unsafe {
                let bits = _mm256_add_epi32(_mm256_castps_si256(t.0), _mm256_set1_epi32(127));
                Self(_mm256_mul_ps(
                    self.0,
                    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)),
                ))
            }
        }
        #[inline(always)]
        fn select_lt(a: Self, b: Self, then: Self, otherwise: Self) -> Self {
            unsafe {
                let lt = _mm256_cmp_ps::<_CMP_LT_OQ>(a.0, b.0);
                Self(_mm256_blendv_ps(otherwise.0, then.0, lt))
            }
        }
        #[inline(always)]
        fn frexp(self) -> (Self, Self) {
            unsafe {
                let bits = _mm256_castps_si256(self.0);
                let m = _mm256_or_si256(
                    _mm256_and_si256(bits, _mm256_set1_epi32(0x807F_FFFF_u32 as i32)),
                    _mm256_set1_epi32(0x3F00_0000),
                );
                let e = _mm256_sub_epi32(_mm256_srli_epi32::<23>(bits), _mm256_set1_epi32(126));
                (Self(_mm256_castsi256_ps(m)), Self(_mm256_cvtepi32_ps(e)))
            }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            unsafe {
                // ((0+4) + (2+6)) + ((1+5) + (3+7)).
                let half = _mm_add_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
                _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
            }
        }
        #[inline(always)]
        fn sums(rows: &[Self]) -> Self {
            let r: &[Self; 8] = rows.try_into().expect("8 rows");
            unsafe {
                // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]: two
                // levels leave rows 0-3 (then 4-7) summed per 128-bit half, the halves add last.
                let pair = |a: Self, b: Self| _mm256_hadd_ps(a.0, b.0);
                let low = _mm256_hadd_ps(pair(r[0], r[1]), pair(r[2], r[3]));
                let high = _mm256_hadd_ps(pair(r[4], r[5]), pair(r[6], r[7]));
                Self(_mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(low, high),
                    _mm256_permute2f128_ps::<0x31>(low, high),
                ))
            }
        }
        #[inline(always)]
        fn max_lane(self) -> f32 {
            unsafe {
                let half = _mm_max_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let quarter = _mm_max_ps(half, _mm_movehl_ps(half, half));
                _mm_cvtss_f32(_mm_max_ss(quarter, _mm_movehdup_ps(quarter)))
            }
        }
        #[inline(always)]
        fn sqrt(self) -> Self {
            unsafe { Self(_mm256_sqrt_ps(self.0)) }
        }
    }
}

/// AVX-512F vectors. Invariant: an [`F32x16`] exists only on a CPU with AVX-512F, AVX2 and FMA
/// (the three that [`super::detected_simd_level`] requires of [`SimdLevel::Avx512`]). It is made
/// from floats by `splat` and `load_at`, which take an `Isa<F32x16>`, and from other `F32x16`s by
/// the operations below.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::{Add, Div, Mul, Sub};

    use super::{Isa, SimdLevel};

    #[derive(Clone, Copy)]
    pub(crate) struct F32x16(__m512);

    // SAFETY (every `unsafe` block in this module but `load_at` and `store_at`, which say their
    // own): the intrinsics need AVX-512F (the reductions also AVX2, through `F32x8`), which the
    // module invariant guarantees.
    impl Add for F32x16 {
        type Output = Self;
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Self(_mm512_add_ps(self.0, o.0)) }
        }
    }
    impl Sub for F32x16 {
        type Output = Self;
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { Self(_mm512_sub_ps(self.0, o.0)) }
        }
    }
    impl Mul for F32x16 {
        type Output = Self;
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { Self(_mm512_mul_ps(self.0, o.0)) }
        }
    }
    impl Div for F32x16 {
        type Output = Self;
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { Self(_mm512_div_ps(self.0, o.0)) }
        }
    }

    impl super::Lanes for F32x16 {
        const WIDTH: usize = 16;
        const LEVEL: SimdLevel = SimdLevel::Avx512;
        #[inline(always)]
        fn splat(_isa: Isa<Self>, x: f32) -> Self {
            unsafe { Self(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load_at(_isa: Isa<Self>, src: &[f32], i: usize) -> Self {
            debug_assert!(i + 16 <= src.len());
            // SAFETY: the token proves AVX-512F; `i + 16 <= src.len()`, the caller's promise.
            unsafe { Self(_mm512_loadu_ps(src.as_ptr().add(i))) }
        }
        #[inline(always)]
        unsafe fn store_at(self, dst: &mut [f32], i: usize) {
            debug_assert!(i + 16 <= dst.len());
            // SAFETY: `self` exists, so the CPU has AVX-512F; `i + 16 <= dst.len()`, the
            // caller's promise.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(i), self.0) }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { Self(_mm512_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn max(self, other: Self) -> Self {
            // `vmaxps` returns its second operand when either is NaN.
            unsafe { Self(_mm512_max_ps(other.0, self.0)) }
        }
        #[inline(always)]
        fn min(self, other: Self) -> Self {
            unsafe { Self(_mm512_min_ps(other.0, self.0)) }
        }
        #[inline(always)]
        fn scale_pow2(self, k: Self, _t: Self) -> Self {
            unsafe { Self(_mm512_scalef_ps(self.0, k.0)) }
        }
        #[inline(always)]
        fn select_lt(a: Self, b: Self, then: Self, otherwise: Self) -> Self {
            unsafe {
                let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a.0, b.0);
                Self(_mm512_mask_blend_ps(lt, otherwise.0, then.0))
            }
        }
        #[inline(always)]
        fn frexp(self) -> (Self, Self) {
            unsafe {
                let bits = _mm512_castps_si512(self.0);
                let m = _mm512_or_si512(
                    _mm512_and_si512(bits, _mm512_set1_epi32(0x807F_FFFF_u32 as i32)),
                    _mm512_set1_epi32(0x3F00_0000),
                );
                let e = _mm512_sub_epi32(_mm512_srli_epi32::<23>(bits), _mm512_set1_epi32(126));
                (Self(_mm512_castsi512_ps(m)), Self(_mm512_cvtepi32_ps(e)))
            }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            unsafe {
                // Halves, then the AVX2 order on the 8 partial sums.
                let lo = _mm512_castps512_ps256(self.0);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
                super::avx2::F32x8(_mm256_add_ps(lo, hi)).sum()
            }
        }
        #[inline(always)]
        fn sums(rows: &[Self]) -> Self {
            let r: &[Self; 16] = rows.try_into().expect("16 rows");
            // Four levels, each adding two shuffles of a pair of vectors: 128-bit quarters
            // (rows i and i+8, then i and i+4), then lanes within quarters (i and i+2, then 0
            // and 1). The result's lane L then holds the sum of input PERM[L]; PERM is its own
            // inverse, so feeding the rows in PERM order puts row L's sum in lane L.
            const PERM: [usize; 16] = [0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15];
            unsafe {
                let quarters = |a: __m512, b: __m512, lo: bool| match lo {
                    true => _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x44>(a, b),
                        _mm512_shuffle_f32x4::<0xEE>(a, b),
                    ),
                    false => _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x88>(a, b),
                        _mm512_shuffle_f32x4::<0xDD>(a, b),
                    ),
                };
                let lanes = |a: __m512, b: __m512, lo: bool| match lo {
                    true => _mm512_add_ps(
                        _mm512_shuffle_ps::<0x44>(a, b),
                        _mm512_shuffle_ps::<0xEE>(a, b),
                    ),
                    false => _mm512_add_ps(
                        _mm512_shuffle_ps::<0x88>(a, b),
                        _mm512_shuffle_ps::<0xDD>(a, b),
                    ),
                };
                let v: [__m512; 16] = std::array::from_fn(|i| r[PERM[i]].0);
                let w: [__m512; 8] = std::array::from_fn(|i| quarters(v[i], v[i + 8], true));
                let x: [__m512; 4] = std::array::from_fn(|i| quarters(w[i], w[i + 4], false));
                let y: [__m512; 2] = std::array::from_fn(|i| lanes(x[i], x[i + 2], true));
                Self(lanes(y[0], y[1], false))
            }
        }
        #[inline(always)]
        fn max_lane(self) -> f32 {
            unsafe {
                let lo = _mm512_castps512_ps256(self.0);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
                super::avx2::F32x8(_mm256_max_ps(lo, hi)).max_lane()
            }
        }
        #[inline(always)]
        fn sqrt(self) -> Self {
            unsafe { Self(_mm512_sqrt_ps(self.0)) }
        }
    }
}

/// `1.5·2^23`: adding it to a float of magnitude below `2^22` rounds it to the nearest integer,
/// which lands in the low mantissa bits (see [`Lanes::scale_pow2`]); subtracting it again gives
/// that integer as a float.
const ROUND_TO_INTEGER: f32 = 12_582_912.0;

/// `exp(x)` without libm, so that it vectorizes: Cody-Waite reduction `x = k ln2 + r`, a
/// degree-5 polynomial for `e^r` on `|r| <= ln2/2` (Cephes `expf` coefficients) and `·2^k`
/// ([`Lanes::scale_pow2`]). Relative error below 2e-7 (tested). Inputs below `ln(2^-126)` give 0
/// (no subnormals); inputs above 88 saturate at `e^88` (softplus clamps its argument at 20,
/// and `1 / (1 + e^88)` is already 0 in the sigmoid); NaN gives NaN.
#[inline(always)]
pub(crate) fn exp_approx<V: Lanes>(x: V) -> V {
    let isa = x.isa();
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.max(isa.splat(LO)).min(isa.splat(HI));
    let t = xc.mul_add(
        isa.splat(std::f32::consts::LOG2_E),
        isa.splat(ROUND_TO_INTEGER),
    );
    let k = t - isa.splat(ROUND_TO_INTEGER);
    let r = k.mul_add(isa.splat(-LN2_HI), xc);
    let r = k.mul_add(isa.splat(-LN2_LO), r);
    let mut p = isa.splat(1.987_569_1e-4);
    p = p.mul_add(r, isa.splat(1.398_2e-3));
    p = p.mul_add(r, isa.splat(8.333_452e-3));
    p = p.mul_add(r, isa.splat(4.166_579_6e-2));
    p = p.mul_add(r, isa.splat(0.166_666_65));
    p = p.mul_add(r, isa.splat(0.5));
    let er = p.mul_add(r * r, r) + isa.splat(1.0);
    V::select_lt(x, isa.splat(LO), isa.splat(0.0), er.scale_pow2(k, t))
}

/// `2^x` for `x` in `[-125, 127]`, with fewer operations than [`exp_approx`] for arguments whose
/// factor `log2 e` can be folded into a constant: the scan's decays `exp(Δ·A) = 2^(Δ·A·log2 e)`
/// scale `A` once per state vector. `x = k + f` with `k` the nearest integer (no Cody-Waite
/// reduction: the reduction is exact), a degree-6 polynomial for `2^f` on `|f| <= 1/2` (the
/// Cephes `exp2f` coefficients) and `·2^k`. Relative error below 2e-7 (tested). Inputs below
/// `-125` give `2^-125` (≈ 2e-38; never a subnormal, which would cost a microcode assist per
/// lane); NaN gives NaN.
#[inline(always)]
pub(crate) fn exp2_approx<V: Lanes>(x: V) -> V {
    let isa = x.isa();
    let x = x.max(isa.splat(-125.0));
    let t = x + isa.splat(ROUND_TO_INTEGER);
    let k = t - isa.splat(ROUND_TO_INTEGER);
    let f = x - k;
    let mut p = isa.splat(1.535_336_2e-4);
    p = p.mul_add(f, isa.splat(1.339_887_5e-3));
    p = p.mul_add(f, isa.splat(9.618_437e-3));
    p = p.mul_add(f, isa.splat(5.550_332_4e-2));
    p = p.mul_add(f, isa.splat(0.240_226_48));
    p = p.mul_add(f, isa.splat(std::f32::consts::LN_2));
    p.mul_add(f, isa.splat(1.0)).scale_pow2(k, t)
}

/// `ln(x)` for finite `x >= 1`, Cephes `logf`: `x = m·2^e` with `m` in `[√½, √2)`, then a
/// polynomial in `m - 1`. Relative error ~1e-7 (tested).
#[inline(always)]
pub(crate) fn ln_ge1<V: Lanes>(x: V) -> V {
    let isa = x.isa();
    let one = isa.splat(1.0);
    let (m, e) = x.frexp();
    let small = V::select_lt(
        m,
        isa.splat(std::f32::consts::FRAC_1_SQRT_2),
        one,
        isa.splat(0.0),
    );
    let e = e - small;
    // m - 1, or 2m - 1 when m < √½ (exact).
    let x = m.mul_add(one + small, isa.splat(-1.0));
    let z = x * x;
    let mut p = isa.splat(7.037_683_6e-2);
    for coefficient in [
        -1.151_461e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_5e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ] {
        p = p.mul_add(x, isa.splat(coefficient));
    }
    let y = e.mul_add(isa.splat(-2.121_944_4e-4), p * x * z);
    let y = z.mul_add(isa.splat(-0.5), y);
    e.mul_add(isa.splat(0.693_359_4), x + y)
}

/// mamba-ssm's softplus `log1p(exp(x))` (`x` itself above 20) and its derivative
/// `exp(x) / (1 + exp(x))` (1 above 20).
#[inline(always)]
pub(crate) fn softplus_and_grad<V: Lanes>(x: V) -> (V, V) {
    let isa = x.isa();
    let one = isa.splat(1.0);
    let threshold = isa.splat(20.0);
    let e = exp_approx(x.min(threshold));
    let u = one + e;
    // log1p(e) = ln(1 + e) + (e - ((1 + e) - 1)) / (1 + e): the correction restores what the
    // rounding of 1 + e lost, so tiny e (very negative x) still gives log1p(e) ≈ e.
    let log1p = ln_ge1(u) + (e - (u - one)) / u;
    (
        V::select_lt(threshold, x, x, log1p),
        V::select_lt(threshold, x, one, e / u),
    )
}

#[inline(always)]
pub(crate) fn sigmoid<V: Lanes>(x: V) -> V {
    let isa = x.isa();
    let one = isa.splat(1.0);
    one / (one + exp_approx(isa.splat(0.0) - x))
}
#[cfg(test)]
mod tests {
    use super::*;

    /// The levels this CPU can run.
    fn levels() -> Vec<SimdLevel> {
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|&l| l <= detected_simd_level())
            .collect()
    }

    /// The vector functions under test, by index, over `xs` (a multiple of 16 long).
    #[inline(always)]
    fn apply_generic<V: Lanes>(
        isa: Isa<V>,
        _level: SimdLevel,
        function: usize,
        xs: &[f32],
        out: &mut [f32],
    ) {
        for (x, out) in xs
            .chunks_exact(V::WIDTH)
            .zip(out.chunks_exact_mut(V::WIDTH))
        {
            let x = isa.load(x);
            let y = match function {
                0 => exp_approx(x),
                1 => ln_ge1(x),
                2 => softplus_and_grad(x).0,
                3 => softplus_and_grad(x).1,
                4 => sigmoid(x),
                5 => isa.splat(x.sum()),
                6 => isa.splat(x.max_lane()),
                7 => x.sqrt(),
                _ => exp2_approx(x),
            };
            y.store(out);
        }
    }

    simd_dispatch!(fn apply(level: SimdLevel, function: usize, xs: &[f32], out: &mut [f32])
        = apply_generic, level = level);

    /// Max relative error of `function` at `level` against `want` on `xs`.
    fn max_rel_error(
        level: SimdLevel,
        function: usize,
        xs: &[f32],
        want: &dyn Fn(f64) -> f64,
    ) -> f64 {
        let mut out = vec![0f32; xs.len()];
        apply(level, function, xs, &mut out);
        xs.iter().zip(&out).fold(0f64, |worst, (&x, &got)| {
            let want = want(x as f64);
            worst.max(((got as f64 - want) / want).abs())
        })
    }

    fn grid(lo: f32, hi: f32, step: f32) -> Vec<f32> {
        let n = ((hi - lo) / step) as usize / 16 * 16;
        (0..n).map(|i| lo + step * i as f32).collect()
    }

    #[test]
    fn vector_math_relative_errors_at_every_level() {
        let softplus = |x: f64| if x > 20.0 { x } else { x.exp().ln_1p() };
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let softplus_grad = |x: f64| if x > 20.0 { 1.0 } else { sigmoid(x) };
        // (name, function index in `apply_generic`, inputs, exact function, tolerance).
        type Case<'a> = (&'a str, usize, Vec<f32>, &'a dyn Fn(f64) -> f64, f64);
        let cases: [Case; 6] = [
            ("exp", 0, grid(-87.3, 88.0, 1.3e-3), &f64::exp, 2e-7),
            ("ln", 1, grid(1.0, 4e8, 3.1e3), &f64::ln, 2e-7),
            ("softplus", 2, grid(-40.0, 40.0, 3e-4), &softplus, 4e-7),
            (
                "softplus'",
                3,
                grid(-40.0, 40.0, 3e-4),
                &softplus_grad,
                4e-7,
            ),
            ("sigmoid", 4, grid(-40.0, 40.0, 3e-4), &sigmoid, 4e-7),
            ("exp2", 8, grid(-125.0, 127.0, 3.7e-3), &f64::exp2, 2e-7),
        ];
        for level in levels() {
            for &(name, function, ref xs, exact, tol) in &cases {
                let err = max_rel_error(level, function, xs, exact);
                assert!(err <= tol, "{name} {level:?}: {err:e} > {tol:e}");
            }
        }
    }

    #[test]
    fn horizontal_sum_max_and_sqrt_at_every_level() {
        let xs: Vec<f32> = (0..64).map(|i| ((i * 37) % 23) as f32 - 7.5).collect();
        for level in levels() {
            let width = level.width();
            let mut out = vec![0f32; xs.len()];
            apply(level, 5, &xs, &mut out);
            for (x, got) in xs.chunks(width).zip(out.chunks(width)) {
                assert_eq!(got[0], x.iter().sum::<f32>(), "{level:?} sum");
            }
            apply(level, 6, &xs, &mut out);
            for (x, got) in xs.chunks(width).zip(out.chunks(width)) {
                assert_eq!(
                    got[0],
                    x.iter().cloned().fold(f32::MIN, f32::max),
                    "{level:?} max"
                );
            }
            let squares: Vec<f32> = xs.iter().map(|x| x * x).collect();
            apply(level, 7, &squares, &mut out);
            for (x, got) in xs.iter().zip(&out) {
                assert_eq!(*got, x.abs(), "{level:?} sqrt");
            }
        }
    }

    #[inline(always)]
    fn sums_generic<V: Lanes>(isa: Isa<V>, _level: SimdLevel, rows: &[f32], out: &mut [f32]) {
        let vectors: Vec<V> = rows.chunks_exact(V::WIDTH).map(|r| isa.load(r)).collect();
        V::sums(&vectors).store(out);
    }

    simd_dispatch!(fn sums_at(level: SimdLevel, rows: &[f32], out: &mut [f32])
        = sums_generic, level = level);

    #[test]
    fn sums_of_width_rows_at_every_level() {
        for level in levels() {
            let width = level.width();
            // Integer values: every summation order gives the exact sum.
            let rows: Vec<f32> = (0..width * width)
                .map(|i| ((i * 53) % 31) as f32 - 15.0)
                .collect();
            let mut out = vec![0f32; width];
            sums_at(level, &rows, &mut out);
            let want: Vec<f32> = rows.chunks(width).map(|r| r.iter().sum()).collect();
            assert_eq!(out, want, "{level:?}");
        }
    }

    #[test]
    fn exp_approx_edges() {
        assert_eq!(exp_approx(-100f32), 0.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(0f32), 1.0);
        assert!(exp_approx(f32::NAN).is_nan());
    }

    #[test]
    fn exp2_approx_edges_at_every_level() {
        let mut xs = vec![
            f32::NEG_INFINITY,
            -1e30,
            -200.0,
            -125.0,
            -1.0,
            0.0,
            3.0,
            f32::NAN,
        ];
        xs.resize(16, -7.0);
        let floor = 2f32.powi(-125);
        let want = [floor, floor, floor, floor, 0.5, 1.0, 8.0];
        for level in levels() {
            let mut out = vec![0f32; 16];
            apply(level, 8, &xs, &mut out);
            assert_eq!(out[..7], want, "{level:?}");
            assert!(out[7].is_nan(), "{level:?}: NaN must propagate");
            assert!(out[8..].iter().all(|&y| y == 2f32.powi(-7)), "{level:?}");
        }
    }

    #[test]
    fn tokens_exist_only_for_the_instructions_this_cpu_has() {
        assert_eq!(std::mem::size_of::<Isa<f32>>(), 0);
        assert!(Isa::<f32>::detect().is_some());
        #[cfg(target_arch = "x86_64")]
        {
            let has = |level| detected_simd_level() >= level;
            assert_eq!(std::mem::size_of::<Isa<avx512::F32x16>>(), 0);
            assert_eq!(Isa::<avx2::F32x8>::detect().is_some(), has(SimdLevel::Avx2));
            assert_eq!(
                Isa::<avx512::F32x16>::detect().is_some(),
                has(SimdLevel::Avx512)
            );
            // A dispatch above the CPU's level stops before any of its instructions run.
            for level in [SimdLevel::Avx2, SimdLevel::Avx512] {
                if !has(level) {
                    let mut out = [0f32; 16];
                    let run =
                        std::panic::catch_unwind(move || apply(level, 0, &[0.0; 16], &mut out));
                    assert!(run.is_err(), "{level:?}");
                }
            }
        }
    }

    #[test]
    fn the_level_is_capped_by_the_cpu_and_parsed_from_names() {
        assert!(simd_level() <= detected_simd_level());
        assert_eq!(SimdLevel::parse(" AVX2 "), Some(SimdLevel::Avx2));
        assert_eq!(SimdLevel::parse("avx512"), Some(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse("sse"), None);
        assert_eq!(level_dividing(12), SimdLevel::Scalar);
        assert!(level_dividing(16) >= level_dividing(8));
    }

    /// The build must not assume AVX2 or AVX-512: every wide path is chosen at run time, so the
    /// same binary runs on any x86-64 CPU (a `-C target-cpu=native` build would break that).
    #[test]
    #[allow(clippy::assertions_on_constants)] // the constants are what the test checks
    fn the_build_targets_baseline_x86_64() {
        assert!(
            !cfg!(target_feature = "avx2"),
            "built with AVX2 enabled at compile time"
        );
        assert!(
            !cfg!(target_feature = "avx512f"),
            "built with AVX-512 enabled at compile time"
        );
    }
}
