use super::*;
use crate::train::flat::FlatParams;

/// The flat parameters and their AdamW, driven as the trainer drives them:
/// gradient set, scale from the norm (and divisor), update.
struct Opt {
    p: FlatParams,
    a: AdamW,
    divisor: Option<Tensor>,
    scale: Option<Tensor>,
}

impl Opt {
    fn new(params: Vec<(String, Tensor)>, no_decay: impl Fn(&str) -> bool, hp: AdamWParams) -> Self {
        let p = FlatParams::new(params, no_decay).unwrap();
        let a = AdamW::new(&p, hp);
        Self { p, a, divisor: None, scale: None }
    }

    fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.a = self.a.with_kernel(kernel);
        self
    }

    fn set_grad(&mut self, g: &Tensor) {
        self.p.grad_mut().copy_(g);
    }

    fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        let (norm, scale) = grad_scale(self.p.grad_norm(), self.divisor.as_ref(), max_norm);
        self.scale = scale;
        norm
    }

    fn step(&mut self, lr: f64, skip: &Tensor) -> Result<()> {
        let scale = self.scale.take();
        self.divisor = None;
        self.a.step(&mut self.p, lr, scale.as_ref(), skip)
    }

    fn master(&self) -> &Tensor {
        self.p.master()
    }

    fn shadow(&self) -> &Tensor {
        self.p.compute_buffer()
    }

    fn numel(&self) -> i64 {
        self.p.numel()
    }
}

/// AdamW as whole-buffer tensor ops, the reference for both kernels
/// (`torch.optim.AdamW`'s for-loop implementation): `t` is the step count
/// after this update, `coef` the clipping factor.
fn reference_step(opt: &mut Opt, lr: f64, t: f64, coef: f64) {
    let hp = opt.a.hp;
    let b = opt.p.update_buffers();
    let (m, v) = (&mut opt.a.exp_avg, &mut opt.a.exp_avg_sq);
    tch::no_grad(|| {
        let g = b.grad * coef;
        if hp.weight_decay != 0.0 && b.n_decay > 0 {
            let _ = b.master.narrow(0, 0, b.n_decay).g_mul_scalar_(1.0 - lr * hp.weight_decay);
        }
        let _ = m.lerp_(&g, 1.0 - hp.beta1);
        let _ = v.g_mul_scalar_(hp.beta2);
        let _ = v.addcmul_(&g, &g.g_mul_scalar(1.0 - hp.beta2));
        let bc1 = 1.0 - hp.beta1.powf(t);
        let bc2 = 1.0 - hp.beta2.powf(t);
        let denom = (v.sqrt() / bc2.sqrt()).g_add_scalar_(hp.eps);
        let _ = b.master.addcdiv_(&(&*m * (-lr / bc1)), &denom);
        if let Some(shadow) = b.shadow {
            shadow.copy_(b.master);
        }
    });
}

const KERNELS: [Kernel; 2] = [Kernel::Rust, Kernel::Torch];

fn no_skip() -> Tensor {
    Tensor::zeros([], (Kind::Float, Device::Cpu))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
}

/// `a` equals `b` to a few ulps of `b`'s largest element.
fn close(a: &Tensor, b: &Tensor) -> bool {
    max_diff(a, b) <= 1e-6 * b.abs().max().double_value(&[]).max(1e-30)
}

/// A decayed matrix and an undecayed bias, with a bf16 compute copy when
/// `shadow`. Not drawn from libtorch's generator, which the tests running in
/// parallel share.
fn model(seed: i64, kernel: Kernel, shadow: bool) -> Opt {
    let hp = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let values = |n: i64| (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37 + seed as f64).sin() * 2.0;
    let w = values(70_000).view([1000, 70]);
    let b = values(70);
    let mut opt = Opt::new(vec![("w".into(), w.copy()), ("b".into(), b.copy())], |n| n == "b", hp).with_kernel(kernel);
    if shadow {
        let compute = vec![("w".into(), w.to_kind(Kind::BFloat16)), ("b".into(), b.to_kind(Kind::BFloat16))];
        opt.p.attach_shadow(&compute, Kind::BFloat16);
    }
    opt
}

/// Our flat AdamW must equal torch.optim.AdamW; these numbers are from
/// torch 2.11 (lr 0.1, betas (0.9, 0.999), eps 1e-8, wd 0.1, two steps with
/// grads [0.5, -1.0] then [0.25, 2.0] on p = [1.0, 2.0], the second entry
/// without decay). Both kernels.
#[test]
fn adamw_matches_torch_reference() {
    for kernel in KERNELS {
        let p1 = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let p2 = Tensor::from_slice(&[2.0f32]).set_requires_grad(true);
        let hp = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let params = vec![("w".into(), p1.shallow_clone()), ("b".into(), p2.shallow_clone())];
        let mut opt = Opt::new(params, |n| n == "b", hp).with_kernel(kernel);
        for g in [[0.5f32, -1.0], [0.25, 2.0]] {
            opt.set_grad(&Tensor::from_slice(&g));
            opt.step(0.1, &no_skip()).unwrap();
        }
        let got: Vec<f32> = Vec::try_from(opt.master()).unwrap();
        // torch: p = [0.7878821, 2.0633895] (decay on "w" only).
        assert!((got[0] - 0.787_882_1).abs() < 1e-5, "{kernel:?}: {got:?}");
        assert!((got[1] - 2.063_389_5).abs() < 1e-5, "{kernel:?}: {got:?}");
        // the parameters are views of the master buffer
        assert!((f64::try_from(&p1).unwrap() - got[0] as f64).abs() < 1e-7);
        assert_eq!(opt.a.steps(), 2);
    }
}

/// Both kernels equal the tensor reference over several steps, with the
/// decay split, the clipping active (max_norm 1 on gradients of norm ~265)
/// and inactive (max_norm 1e6), and the bf16 shadow.
#[test]
fn fused_kernels_equal_the_tensor_reference_with_and_without_clipping() {
    for kernel in KERNELS {
        for max_norm in [1.0, 1e6, 0.0] {
            let (mut fused, mut plain) = (model(0, kernel, true), model(0, kernel, true));
            for t in 1..=4 {
                let g = Tensor::randn([fused.numel()], (Kind::Float, Device::Cpu));
                fused.set_grad(&g);
                plain.set_grad(&g);
                let norm = fused.clip_grad_norm(max_norm).double_value(&[]);
                let coef = if max_norm > 0.0 { (max_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
                fused.step(1e-2, &no_skip()).unwrap();
                reference_step(&mut plain, 1e-2, t as f64, coef);
            }
            let what = format!("{kernel:?}, max_norm {max_norm}");
            assert!(close(fused.master(), plain.master()), "{what}: {}", max_diff(fused.master(), plain.master()));
            assert!(
                close(&fused.a.exp_avg, &plain.a.exp_avg),
                "{what}: {}",
                max_diff(&fused.a.exp_avg, &plain.a.exp_avg)
            );
            let diff = max_diff(&fused.a.exp_avg_sq, &plain.a.exp_avg_sq);
            assert!(close(&fused.a.exp_avg_sq, &plain.a.exp_avg_sq), "{what}: {diff}");
            // The compute copy is torch's rounding of the master.
            let shadow = fused.shadow();
            assert!(shadow.equal(&fused.master().to_kind(Kind::BFloat16)), "{what}");
            assert_eq!(fused.a.steps(), 4, "{what}");
        }
    }
}

/// A summed gradient with its divisor (several workers) updates as the
/// divided gradient does, with the norm of the divided one, for both kernels,
/// clipping on and off.
#[test]
fn a_divisor_is_applied_by_the_update_as_if_the_gradient_were_divided() {
    // The divided gradient is rounded once more: a few ulps, summed over 70k elements.
    let near = |a: &Tensor, b: &Tensor| max_diff(a, b) <= 1e-5 * b.abs().max().double_value(&[]);
    for kernel in KERNELS {
        for max_norm in [1.0, 0.0] {
            let (mut summed, mut divided) = (model(5, kernel, true), model(5, kernel, true));
            for _ in 0..3 {
                let g = Tensor::randn([summed.numel()], (Kind::Float, Device::Cpu)) * 300.0;
                summed.set_grad(&g);
                divided.set_grad(&(&g / 300.0));
                summed.divisor = Some(Tensor::from(300.0f32));
                let (a, b) = (summed.clip_grad_norm(max_norm), divided.clip_grad_norm(max_norm));
                assert!(near(&a, &b), "{kernel:?}: norm {a:?} vs {b:?}");
                summed.step(1e-2, &no_skip()).unwrap();
                divided.step(1e-2, &no_skip()).unwrap();
            }
            let what = format!("{kernel:?}, max_norm {max_norm}");
            assert!(near(summed.master(), divided.master()), "{what}: {}", max_diff(summed.master(), divided.master()));
            let diff = max_diff(&summed.a.exp_avg_sq, &divided.a.exp_avg_sq);
            let top = divided.a.exp_avg_sq.abs().max().double_value(&[]);
            assert!(near(&summed.a.exp_avg_sq, &divided.a.exp_avg_sq), "{what}: {diff} of {top}");
        }
    }
}

/// The two kernels agree with each other too (clipping active).
#[test]
fn torch_kernel_equals_the_rust_kernel() {
    let (mut a, mut b) = (model(3, Kernel::Rust, false), model(3, Kernel::Torch, false));
    for _ in 0..3 {
        let g = Tensor::randn([a.numel()], (Kind::Float, Device::Cpu)) * 10.0;
        a.set_grad(&g);
        b.set_grad(&g);
        let _ = a.clip_grad_norm(5.0);
        let _ = b.clip_grad_norm(5.0);
        a.step(3e-3, &no_skip()).unwrap();
        b.step(3e-3, &no_skip()).unwrap();
    }
    assert!(close(a.master(), b.master()), "{}", max_diff(a.master(), b.master()));
    assert!(close(&a.a.exp_avg, &b.a.exp_avg), "{}", max_diff(&a.a.exp_avg, &b.a.exp_avg));
    assert!(close(&a.a.exp_avg_sq, &b.a.exp_avg_sq), "{}", max_diff(&a.a.exp_avg_sq, &b.a.exp_avg_sq));
}

/// A set skip flag leaves master, moments, shadow and the step count as they
/// were; the next real step continues with the count of real steps.
#[test]
fn a_skipped_step_changes_nothing() {
    for kernel in KERNELS {
        let (mut opt, mut plain) = (model(2, kernel, true), model(2, kernel, true));
        let step = |opt: &mut Opt, g: &Tensor, skip: f64| {
            opt.set_grad(g);
            let _ = opt.clip_grad_norm(1.0);
            opt.step(1e-2, &no_skip().fill_(skip)).unwrap();
        };
        let g = Tensor::randn([opt.numel()], (Kind::Float, Device::Cpu));
        step(&mut opt, &g, 0.0);
        let before: Vec<Tensor> =
            [opt.master(), &opt.a.exp_avg, &opt.a.exp_avg_sq, opt.shadow()].map(Tensor::copy).into();
        let nan = g.copy().index_fill_(0, &Tensor::from_slice(&[5i64]), f64::NAN);
        step(&mut opt, &nan, 1.0);
        step(&mut opt, &g, 1.0);
        let after = [opt.master(), &opt.a.exp_avg, &opt.a.exp_avg_sq, opt.shadow()];
        for (b, a) in before.iter().zip(after) {
            assert!(b.equal(a), "{kernel:?}: a skipped step changed a buffer");
        }
        assert_eq!(opt.a.steps(), 1, "{kernel:?}");
        // Then: the same as two real steps without the skipped ones.
        let g2 = Tensor::randn([opt.numel()], (Kind::Float, Device::Cpu));
        step(&mut opt, &g2, 0.0);
        step(&mut plain, &g, 0.0);
        step(&mut plain, &g2, 0.0);
        assert!(max_diff(opt.master(), plain.master()) == 0.0, "{kernel:?}");
        assert_eq!(opt.a.steps(), 2, "{kernel:?}");
    }
}

#[test]
fn step_count_is_restored() {
    for kernel in KERNELS {
        let mut a = model(4, kernel, false);
        for _ in 0..3 {
            a.set_grad(&Tensor::randn([a.numel()], (Kind::Float, Device::Cpu)));
            a.step(1e-2, &no_skip()).unwrap();
        }
        let mut b = model(4, kernel, false);
        tch::no_grad(|| b.p.update_buffers().master.copy_(a.master()));
        b.a.restore(&a.a.exp_avg, &a.a.exp_avg_sq, a.a.steps());
        assert_eq!(b.a.steps(), 3);
        let g = Tensor::randn([a.numel()], (Kind::Float, Device::Cpu));
        for o in [&mut a, &mut b] {
            o.set_grad(&g);
            o.step(1e-2, &no_skip()).unwrap();
        }
        assert!(a.master().equal(b.master()), "{kernel:?}: the 4th step used another bias correction");
    }
}

#[test]
fn a_bad_call_into_libtorch_is_an_error_not_a_crash() {
    let mut opt = model(5, Kernel::Torch, false);
    // found_inf must be fp32: libtorch throws, the shim returns the message.
    let err = opt.step(1e-2, &Tensor::zeros([], (Kind::Int64, Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("fused AdamW"), "{err}");
}

/// On a GPU (a no-op without one): libtorch's kernel equals the reference with
/// clipping, a skipped step changes nothing, and no step reads anything back.
#[test]
fn on_cuda_the_fused_step_equals_the_reference_and_reads_nothing_back() {
    if !tch::Cuda::is_available() {
        return;
    }
    let cuda = Device::Cuda(0);
    let mut plain = model(6, Kernel::Torch, false);
    let params: Vec<(String, Tensor)> =
        plain.p.named_master().into_iter().map(|(n, t)| (n, t.to_device(cuda))).collect();
    let compute: Vec<(String, Tensor)> = params.iter().map(|(n, t)| (n.clone(), t.to_kind(Kind::BFloat16))).collect();
    let mut gpu = Opt::new(params, |n| n == "b", plain.a.hp);
    assert_eq!(gpu.a.kernel, Kernel::Torch);
    gpu.p.attach_shadow(&compute, Kind::BFloat16);
    let grads: Vec<Tensor> = (0..4).map(|_| Tensor::randn([plain.numel()], (Kind::Float, Device::Cpu))).collect();
    let reads = host::reads();
    for (i, g) in grads.iter().enumerate() {
        gpu.set_grad(g);
        let norm = gpu.clip_grad_norm(1.0);
        let skip = if i == 2 { norm.full_like(1.0) } else { norm.zeros_like() };
        gpu.step(1e-2, &skip).unwrap();
    }
    assert_eq!(host::reads(), reads, "a GPU step read a tensor back");
    for (t, g) in [1.0, 2.0, 3.0].into_iter().zip(grads.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, g)| g)) {
        plain.set_grad(g);
        let coef = (1.0 / (g.norm().double_value(&[]) + 1e-6)).min(1.0);
        reference_step(&mut plain, 1e-2, t, coef);
    }
    assert!(close(&gpu.master().to_device(Device::Cpu), plain.master()));
    assert!(close(&gpu.a.exp_avg_sq.to_device(Device::Cpu), &plain.a.exp_avg_sq));
    assert!(gpu.shadow().equal(&gpu.master().to_kind(Kind::BFloat16)));
    assert_eq!(gpu.a.steps(), 3);
}

/// Per-step time of the two CPU kernels on a 67M-element buffer with a bf16
/// shadow (docs/benchmarks.md): `cargo test --release --lib adamw_kernel_timings
/// -- --ignored --nocapture`.
#[test]
#[ignore]
fn adamw_kernel_timings() {
    let n = 67_000_000i64;
    for kernel in KERNELS {
        let p = Tensor::randn([n - 1000], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([1000], (Kind::Float, Device::Cpu));
        let hp = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let mut opt =
            Opt::new(vec![("w".into(), p.shallow_clone()), ("b".into(), b.shallow_clone())], |n| n == "b", hp)
                .with_kernel(kernel);
        opt.p.attach_shadow(
            &[("w".into(), p.to_kind(Kind::BFloat16)), ("b".into(), b.to_kind(Kind::BFloat16))],
            Kind::BFloat16,
        );
        let g = Tensor::randn([n], (Kind::Float, Device::Cpu));
        let mut times = vec![];
        for _ in 0..6 {
            opt.set_grad(&g);
            let t0 = std::time::Instant::now();
            let _ = opt.clip_grad_norm(1.0);
            opt.step(1e-3, &no_skip()).unwrap();
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{kernel:?}: clip + step + shadow, median {:.1} ms, min {:.1} ms ({} threads)",
            1e3 * times[3],
            1e3 * times[0],
            tch::get_num_threads()
        );
    }
}
