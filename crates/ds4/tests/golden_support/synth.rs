//! A synthetic model of another shape than the fixtures, with random weights: every
//! tensor of the contract (`ds4::model::weights::expected_tensors`), Q8_0 routed experts,
//! F16 plain tensors, F32 elsewhere. Used to check that nothing is tied to one shape.

use ds4::gguf::{GgufFile, GgufWriter, TensorSpec, Value, ValueType};
use ds4::model::weights::{expected_tensors, Role};
use ds4::model::Config;
use ds4::quant::{self, GgmlType};

/// Deterministic pseudo-normal numbers (sum of uniforms).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.uniform()).sum::<f32>() * 1.732 - 3.464
    }
}

/// Shape overrides on top of the tiny-f32 metadata (which brings the tokenizer and the
/// RoPE/YaRN/eps constants).
pub fn odd_shape() -> Vec<(&'static str, Value)> {
    let u = Value::U32;
    vec![
        ("block_count", u(5)),
        ("embedding_length", u(64)),
        ("attention.head_count", u(2)),
        ("attention.key_length", u(96)),
        ("attention.value_length", u(96)),
        ("rope.dimension_count", u(32)),
        ("attention.q_lora_rank", u(32)),
        ("attention.output_lora_rank", u(8)),
        ("attention.output_group_count", u(2)),
        ("expert_count", u(5)),
        ("expert_used_count", u(2)),
        ("expert_feed_forward_length", u(32)),
        ("hash_layer_count", u(1)),
        ("attention.sliding_window", u(7)),
        ("attention.indexer.head_count", u(3)),
        ("attention.indexer.key_length", u(64)),
        ("attention.indexer.top_k", u(5)),
        ("hyper_connection.count", u(3)),
        ("hyper_connection.sinkhorn_iterations", u(10)),
        (
            "attention.compress_ratios",
            Value::Array(ValueType::U32, [0, 4, 128, 4, 0].map(Value::U32).to_vec()),
        ),
        (
            "swiglu_clamp_exp",
            Value::Array(
                ValueType::F32,
                [10.0, 7.0, 10.0, 5.0, 10.0].map(Value::F32).to_vec(),
            ),
        ),
    ]
}

fn fill(
    rng: &mut Rng,
    name: &str,
    role: Role,
    dims: &[u64],
    n_expert: usize,
    ty: GgmlType,
    buf: &mut [u8],
) {
    let n: usize = dims.iter().product::<u64>() as usize;
    if role == Role::TokenTable {
        for c in buf.chunks_exact_mut(4) {
            let e = (rng.uniform() * n_expert as f32) as i32 % n_expert as i32;
            c.copy_from_slice(&e.to_le_bytes());
        }
        return;
    }
    let fan_in = dims[0] as f32;
    let vals: Vec<f32> = (0..n)
        .map(|_| {
            let z = rng.normal();
            match role {
                Role::Embedding => z,
                Role::Vector if name.contains("norm") => 1.0 + 0.1 * z,
                Role::Vector => 0.5 * z,
                _ if name.contains("ape") => 0.3 * z,
                _ => z / fan_in.sqrt(),
            }
        })
        .collect();
    quant::quantize_row(ty, &vals, buf).unwrap();
}

/// The GGUF image of a random model with the `odd_shape` overrides.
pub fn odd_model_bytes(template: &GgufFile, seed: u64) -> Vec<u8> {
    let mut w = GgufWriter::new();
    let overrides = odd_shape();
    for (k, v) in template.metadata() {
        let o = overrides
            .iter()
            .find(|(ok, _)| format!("deepseek4.{ok}") == *k);
        w.add_metadata(k.clone(), o.map_or(v.clone(), |(_, v)| v.clone()))
            .unwrap();
    }
    // Parse the metadata alone to learn the tensor contract of this shape.
    let meta_only = GgufFile::from_bytes(w.to_bytes(|_, _, _| Ok(())).unwrap()).unwrap();
    let cfg = Config::from_gguf(&meta_only).unwrap();
    let tensors = expected_tensors(&cfg);
    let mut types = Vec::new();
    for t in &tensors {
        let ty = match t.role {
            Role::ExpertGateUp | Role::ExpertDown => GgmlType::Q8_0,
            Role::Plain => GgmlType::F16,
            Role::TokenTable => GgmlType::I32,
            _ => GgmlType::F32,
        };
        types.push(ty);
        w.add_tensor(TensorSpec::new(t.name.clone(), &t.dims, ty))
            .unwrap();
    }
    let mut rng = Rng(seed);
    w.to_bytes(|i, _, buf| {
        let t = &tensors[i];
        fill(
            &mut rng,
            &t.name,
            t.role,
            &t.dims,
            cfg.n_expert,
            types[i],
            buf,
        );
        Ok(())
    })
    .unwrap()
}
