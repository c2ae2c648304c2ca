//! Each schedule against its formula at named steps: first, end of warmup (peak), inside the
//! decay, and last.

use std::f64::consts::PI;
use zamba_train::schedule::*;

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-12 * b.abs().max(1e-12), "{a} != {b}");
}

fn cosine(peak: f64, min: f64, w: usize) -> ScheduleConfig {
    ScheduleConfig::Cosine(CosineSchedule {
        peak_lr: peak,
        min_lr: min,
        warmup_steps: w,
    })
}

fn wsd(
    shape: DecayShape,
    decay_steps: Option<usize>,
    decay_fraction: Option<f64>,
) -> ScheduleConfig {
    ScheduleConfig::Wsd(WsdSchedule {
        peak_lr: 1e-3,
        min_lr: 1e-5,
        warmup_steps: 10,
        decay_steps,
        decay_fraction,
        decay_shape: shape,
    })
}

fn anneal(decay: AnnealDecay, half_life: Option<f64>, rate: Option<f64>) -> ScheduleConfig {
    ScheduleConfig::Anneal(AnnealSchedule {
        start_lr: 1e-5,
        peak_lr: 7.5e-5,
        warmup_steps: 11,
        final_lr: 0.0,
        decay,
        half_life_steps: half_life,
        decay_rate: rate,
    })
}

#[test]
fn constant_with_and_without_warmup() {
    let c = ScheduleConfig::Constant(ConstantSchedule {
        lr: 1e-3,
        warmup_steps: 0,
    });
    close(c.lr(0, 50), 1e-3);
    close(c.lr(49, 50), 1e-3);
    let w = ScheduleConfig::Constant(ConstantSchedule {
        lr: 1e-3,
        warmup_steps: 4,
    });
    // peak · (s+1)/W: the first step is peak/W, never 0; the peak is used at step W-1.
    close(w.lr(0, 50), 2.5e-4);
    close(w.lr(1, 50), 5e-4);
    close(w.lr(3, 50), 1e-3);
    close(w.lr(4, 50), 1e-3);
    close(w.lr(49, 50), 1e-3);
}

#[test]
fn warmup_cosine_first_peak_middle_last() {
    let (peak, min) = (1e-3, 1e-4);
    let s = cosine(peak, min, 10);
    let total = 110;
    close(s.lr(0, total), peak / 10.0);
    close(s.lr(4, total), peak * 5.0 / 10.0);
    close(s.lr(9, total), peak);
    assert_eq!(s.peak_step(), 9);
    // Decay from step 9 (p = 0) to step 109 (p = 1).
    close(s.lr(59, total), min + (peak - min) * 0.5);
    close(
        s.lr(34, total),
        min + (peak - min) * 0.5 * (1.0 + (PI * 0.25).cos()),
    );
    close(s.lr(109, total), min);
    // Past the end the last LR holds.
    close(s.lr(500, total), min);
    // Monotone: up during warmup, down after.
    for step in 1..total {
        let (a, b) = (s.lr(step - 1, total), s.lr(step, total));
        if step <= 9 {
            assert!(b > a)
        } else {
            assert!(b <= a)
        }
    }
}

#[test]
fn cosine_without_warmup_starts_at_the_peak() {
    let s = cosine(1e-3, 0.0, 0);
    close(s.lr(0, 101), 1e-3);
    close(s.lr(50, 101), 0.5e-3);
    close(s.lr(100, 101), 0.0);
}

#[test]
fn wsd_shapes_against_their_formulas() {
    let (peak, min, total) = (1e-3f64, 1e-5f64, 100);
    // Decay over the last 20 steps: step 79 is the last at the peak, 80..=99 decay, 99 = min.
    for shape in [
        DecayShape::Linear,
        DecayShape::Cosine,
        DecayShape::OneMinusSqrt,
        DecayShape::Exponential,
    ] {
        let s = wsd(shape, Some(20), None);
        close(s.lr(0, total), peak / 10.0);
        close(s.lr(9, total), peak);
        close(s.lr(50, total), peak);
        close(s.lr(79, total), peak);
        assert!(s.lr(80, total) < peak, "{shape:?} decays from step 80");
        close(s.lr(99, total), min);
        let p = |step: usize| (step - 79) as f64 / 20.0;
        let expected = |step: usize| match shape {
            DecayShape::Linear => min + (peak - min) * (1.0 - p(step)),
            DecayShape::Cosine => min + (peak - min) * 0.5 * (1.0 + (PI * p(step)).cos()),
            DecayShape::OneMinusSqrt => min + (peak - min) * (1.0 - p(step).sqrt()),
            DecayShape::Exponential => peak * (min / peak).powf(p(step)),
        };
        for step in [80, 84, 89, 95] {
            close(s.lr(step, total), expected(step));
        }
    }
    close(
        wsd(DecayShape::Linear, Some(20), None).lr(89, total),
        min + (peak - min) * 0.5,
    );
    close(
        wsd(DecayShape::OneMinusSqrt, Some(20), None).lr(84, total),
        min + (peak - min) * 0.5,
    );
    close(
        wsd(DecayShape::Exponential, Some(20), None).lr(89, total),
        (peak * min).sqrt(),
    );
    // decay_fraction 0.2 of 100 steps = the same 20 steps.
    let (a, b) = (
        wsd(DecayShape::Cosine, Some(20), None),
        wsd(DecayShape::Cosine, None, Some(0.2)),
    );
    for step in 0..total {
        close(a.lr(step, total), b.lr(step, total));
    }
}

#[test]
fn anneal_rewarms_from_start_then_decays_to_final() {
    let (start, peak, total) = (1e-5, 7.5e-5, 111);
    for decay in [
        AnnealDecay::Exponential,
        AnnealDecay::Linear,
        AnnealDecay::Cosine,
    ] {
        let s = match decay {
            AnnealDecay::Exponential => anneal(decay, Some(10.0), None),
            _ => anneal(decay, None, None),
        };
        // Step 0 is exactly start_lr, step W-1 = 10 exactly the peak, the last step exactly final_lr.
        close(s.lr(0, total), start);
        close(s.lr(5, total), start + (peak - start) * 0.5);
        close(s.lr(10, total), peak);
        assert_eq!(s.lr(110, total), 0.0, "{decay:?}");
    }
    // Exponential with half-life h, normalised so the last step is final: K = 100 steps after the peak.
    let s = anneal(AnnealDecay::Exponential, Some(10.0), None);
    let tail = 0.5f64.powf(10.0);
    close(s.lr(20, total), peak * (0.5 - tail) / (1.0 - tail));
    close(s.lr(30, total), peak * (0.25 - tail) / (1.0 - tail));
    // A per-step rate r is the same curve as a half-life of ln 2 / −ln r.
    let r = 0.9f64;
    let by_rate = anneal(AnnealDecay::Exponential, None, Some(r));
    let by_half_life = anneal(AnnealDecay::Exponential, Some(2f64.ln() / -r.ln()), None);
    for step in [0, 10, 11, 40, 110] {
        close(by_rate.lr(step, total), by_half_life.lr(step, total));
    }
    close(
        by_rate.lr(13, total),
        peak * (r.powi(3) - r.powi(100)) / (1.0 - r.powi(100)),
    );
    close(
        anneal(AnnealDecay::Linear, None, None).lr(60, total),
        peak * 0.5,
    );
}

fn field_of(s: &ScheduleConfig, total: usize) -> String {
    s.validate(total).expect_err("should be rejected").field
}

#[test]
fn nonsense_schedules_are_rejected() {
    assert_eq!(field_of(&cosine(-1e-3, 0.0, 10), 100), "peak_lr");
    assert_eq!(field_of(&cosine(1e-3, 2e-3, 10), 100), "min_lr");
    assert_eq!(field_of(&cosine(1e-3, 0.0, 200), 100), "warmup_steps");
    assert_eq!(field_of(&cosine(f64::NAN, 0.0, 10), 100), "peak_lr");
    assert_eq!(
        field_of(
            &ScheduleConfig::Constant(ConstantSchedule {
                lr: 1e-3,
                warmup_steps: 101
            }),
            100
        ),
        "warmup_steps"
    );
    assert_eq!(
        field_of(&wsd(DecayShape::Linear, Some(20), Some(0.2)), 100),
        "decay_fraction"
    );
    assert_eq!(
        field_of(&wsd(DecayShape::Linear, None, None), 100),
        "decay_steps"
    );
    assert_eq!(
        field_of(&wsd(DecayShape::Linear, Some(95), None), 100),
        "decay_steps"
    );
    assert_eq!(
        field_of(&wsd(DecayShape::Linear, None, Some(1.5)), 100),
        "decay_fraction"
    );
    let mut zero_min = wsd(DecayShape::Exponential, Some(20), None);
    if let ScheduleConfig::Wsd(w) = &mut zero_min {
        w.min_lr = 0.0;
    }
    assert_eq!(field_of(&zero_min, 100), "min_lr");
    assert_eq!(
        field_of(&anneal(AnnealDecay::Exponential, None, None), 100),
        "half_life_steps"
    );
    assert_eq!(
        field_of(
            &anneal(AnnealDecay::Exponential, Some(10.0), Some(0.9)),
            100
        ),
        "decay_rate"
    );
    assert_eq!(
        field_of(&anneal(AnnealDecay::Linear, Some(10.0), None), 100),
        "half_life_steps"
    );
    assert_eq!(
        field_of(&anneal(AnnealDecay::Exponential, None, Some(1.5)), 100),
        "decay_rate"
    );
    let mut up = anneal(AnnealDecay::Linear, None, None);
    if let ScheduleConfig::Anneal(a) = &mut up {
        a.final_lr = 1e-4;
    }
    assert_eq!(field_of(&up, 100), "final_lr");
    let mut short = anneal(AnnealDecay::Linear, None, None);
    if let ScheduleConfig::Anneal(a) = &mut short {
        a.warmup_steps = 1;
    }
    assert_eq!(field_of(&short, 100), "warmup_steps");
    // Valid ones pass.
    cosine(1e-3, 1e-4, 10).validate(100).unwrap();
    wsd(DecayShape::Exponential, None, Some(0.1))
        .validate(100)
        .unwrap();
    anneal(AnnealDecay::Exponential, Some(10.0), None)
        .validate(100)
        .unwrap();
}

#[test]
fn summary_names_first_peak_and_last() {
    let s = cosine(1e-3, 1e-4, 10);
    let text = s.summary(110);
    for needle in [
        "first step",
        "end of warmup",
        "last step",
        "peak",
        "1.000000e-4",
        "1.000000e-3",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
    }
}

#[test]
fn serde_tags_and_shape_names() {
    let s: ScheduleConfig = toml::from_str("kind = \"wsd\"\npeak_lr = 1e-3\nmin_lr = 1e-5\nwarmup_steps = 5\ndecay_fraction = 0.2\ndecay_shape = \"1-sqrt\"").unwrap();
    assert_eq!(s, wsd_with(DecayShape::OneMinusSqrt));
    let back: ScheduleConfig = toml::from_str(&toml::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

fn wsd_with(shape: DecayShape) -> ScheduleConfig {
    ScheduleConfig::Wsd(WsdSchedule {
        peak_lr: 1e-3,
        min_lr: 1e-5,
        warmup_steps: 5,
        decay_steps: None,
        decay_fraction: Some(0.2),
        decay_shape: shape,
    })
}
