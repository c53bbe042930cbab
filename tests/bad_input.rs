//! Bad input gets a typed error with a clear message, and the engine keeps serving afterwards.

mod common;

use common::{engine, real_model, scratch, tiny_model};
use gpo::engine::{Engine, EngineConfig, GenerateRequest, KvMode, Prompt, SamplingParams};
use gpo::gguf::lora::{LoraAdapterFile, LoraTensor};
use gpo::llama::{ChatMessage, LoraAdapter, Model, ModelParams};
use gpo::Error;

fn start(model: &std::path::Path) -> gpo::Result<Engine> {
    Engine::start(EngineConfig {
        model: model.to_path_buf(),
        n_threads: 2,
        n_ctx: 512,
        n_parallel: 2,
        ..Default::default()
    })
}

#[test]
fn model_files_that_are_missing_not_gguf_truncated_or_unknown() {
    let missing = start(std::path::Path::new("/nonexistent/model.gguf")).err().unwrap();
    assert!(matches!(missing, Error::NotFound(_)), "{missing}");
    assert!(missing.to_string().contains("/nonexistent/model.gguf"));

    let text = scratch("not-a-model.gguf");
    std::fs::write(&text, "hello, I am a text file").unwrap();
    let e = start(&text).err().unwrap();
    assert!(matches!(e, Error::NotGguf { .. }), "{e}");
    assert!(e.to_string().contains("not a GGUF file"));
    assert!(!e.to_string().contains("hell"), "the error never quotes the file: {e}");

    // A FIFO is refused without opening it (opening one blocks until a writer comes).
    let fifo = scratch("fifo.gguf");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = start(&fifo).err().unwrap();
    assert!(e.to_string().contains("not a regular file"), "{e}");

    let empty = scratch("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(start(&empty), Err(Error::NotGguf { .. })));

    let truncated = scratch("truncated.gguf");
    let bytes = std::fs::read(real_model()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let e = start(&truncated).err().unwrap();
    assert!(matches!(e, Error::ModelLoad { .. }), "{e}");
    assert!(e.to_string().len() > 40, "the message should carry llama.cpp's reason: {e}");

    let header_only = scratch("header-only.gguf");
    std::fs::write(&header_only, &bytes[..64]).unwrap();
    assert!(matches!(start(&header_only), Err(Error::ModelLoad { .. })));

    // A well-formed GGUF of an architecture llama.cpp does not know.
    let alien = scratch("alien.gguf");
    let md = vec![
        ("general.architecture".to_string(), candle_core::quantized::gguf_file::Value::String("no-such-arch".into())),
        ("general.name".to_string(), candle_core::quantized::gguf_file::Value::String("alien".into())),
    ];
    gpo::gguf::write_atomic(&alien, &md, &[]).unwrap();
    let e = start(&alien).err().unwrap();
    assert!(matches!(e, Error::ModelLoad { .. }), "{e}");
    assert!(e.to_string().contains("no-such-arch"), "{e}");
}

fn lora(model: &std::path::Path, arch: &str, tweak: impl Fn(&mut LoraTensor)) -> std::path::PathBuf {
    let tensors = gpo::gguf::synth::linear_tensors(model)
        .unwrap()
        .into_iter()
        .filter(|(n, _, _)| n.ends_with("attn_q.weight"))
        .map(|(base, n_in, n_out)| {
            let mut t = LoraTensor { base, rank: 2, n_in, n_out, a: vec![0.01; 2 * n_in], b: vec![0.0; 2 * n_out] };
            tweak(&mut t);
            t
        })
        .collect();
    let p = scratch(&format!("lora-{arch}-{}.gguf", rand::random::<u32>()));
    LoraAdapterFile { architecture: arch.into(), alpha: 2.0, tensors }.write(&p).unwrap();
    p
}

#[test]
fn adapters_for_another_architecture_shape_or_model_are_rejected() {
    let model_path = real_model();
    let model = Model::load(&model_path, &ModelParams::default()).unwrap();

    let e = LoraAdapter::load(&model, "/nonexistent/adapter.gguf").err().unwrap();
    assert!(matches!(e, Error::NotFound(_)), "{e}");

    let e = LoraAdapter::load(&model, lora(&model_path, "qwen2", |_| {})).err().unwrap();
    assert!(matches!(e, Error::Adapter { .. }) && e.to_string().contains("arch"), "{e}");

    let wrong_shape = lora(&model_path, "llama", |t| {
        t.n_in += 8;
        t.a = vec![0.01; t.rank * t.n_in];
    });
    let e = LoraAdapter::load(&model, wrong_shape).err().unwrap();
    assert!(matches!(e, Error::Adapter { .. }) && e.to_string().contains("shape"), "{e}");

    let unknown_tensor = lora(&model_path, "llama", |t| t.base = t.base.replace("blk.", "blk.9"));
    let e = LoraAdapter::load(&model, unknown_tensor).err().unwrap();
    assert!(e.to_string().contains("does not exist in base model"), "{e}");

    // An adapter trained for the tiny model does not fit the real one.
    let e = LoraAdapter::load(&model, lora(&tiny_model("llama"), "llama", |_| {})).err().unwrap();
    assert!(matches!(e, Error::Adapter { .. }), "{e}");

    let text = scratch("adapter.txt");
    std::fs::write(&text, "nope").unwrap();
    assert!(matches!(LoraAdapter::load(&model, &text), Err(Error::Adapter { .. })));

    // The engine surfaces the same errors and keeps its version.
    let eng = engine(&model_path, 2, 1024, KvMode::Unified);
    assert!(eng.set_adapter(lora(&model_path, "qwen2", |_| {}), 1.0).is_err());
    assert!(matches!(eng.set_adapter(lora(&model_path, "llama", |_| {}), f32::NAN), Err(Error::Invalid { .. })));
    assert_eq!(eng.stats().unwrap().adapter_version, 0);
}

#[test]
fn requests_with_bad_values_name_the_field() {
    let e = engine(&tiny_model("llama"), 2, 512, KvMode::PerSequence);
    let ok = || GenerateRequest::new(Prompt::user("hi"), 1, SamplingParams::greedy(4));
    let field = |req: GenerateRequest| -> String {
        match e.generate(req) {
            Err(Error::Invalid { what, .. }) => what.to_string(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    };
    assert_eq!(field(GenerateRequest { n: 0, ..ok() }), "n");
    let with = |f: &dyn Fn(&mut SamplingParams)| {
        let mut r = ok();
        f(&mut r.sampling);
        r
    };
    assert_eq!(field(with(&|s| s.temperature = -1.0)), "temperature");
    assert_eq!(field(with(&|s| s.temperature = f32::NAN)), "temperature");
    assert_eq!(field(with(&|s| s.top_k = -3)), "top_k");
    assert_eq!(field(with(&|s| s.top_p = 0.0)), "top_p");
    assert_eq!(field(with(&|s| s.top_p = 1.5)), "top_p");
    assert_eq!(field(with(&|s| s.min_p = 1.0)), "min_p");
    assert_eq!(field(with(&|s| s.max_tokens = 0)), "max_tokens");
    assert_eq!(field(with(&|s| s.stop = vec!["ok".into(), String::new()])), "stop");
    assert_eq!(field(GenerateRequest { prompt: Prompt::Chat(vec![]), ..ok() }), "prompt");
    assert_eq!(field(GenerateRequest { prompt: Prompt::Tokens(vec![]), ..ok() }), "prompt");
    assert_eq!(field(GenerateRequest { prompt: Prompt::Tokens(vec![5, -1]), ..ok() }), "prompt");
    assert_eq!(field(GenerateRequest { prompt: Prompt::Tokens(vec![1_000_000]), ..ok() }), "prompt");
    assert_eq!(field(GenerateRequest { n: 1_000_000, ..ok() }), "n");
    let mut steps = ok();
    steps.steps.delimiter = String::new();
    assert_eq!(field(steps), "steps.delimiter");

    // Per-sequence KV with 2 sequences in 512 cells: a 300-token prompt does not fit.
    let long = "word ".repeat(300);
    match e.generate(GenerateRequest::new(Prompt::Raw(long), 1, SamplingParams::greedy(4))) {
        Err(Error::PromptTooLong { tokens, limit }) => assert!(tokens >= 300 && limit < 256, "{tokens} {limit}"),
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    let parent = e.generate(ok()).unwrap().remove(0);
    assert!(matches!(
        e.fork(&parent, parent.tokens.len() + 1, 1, SamplingParams::greedy(2)),
        Err(Error::Invalid { what: "at", .. })
    ));
    let nul = GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user("a\0b")]), 1, SamplingParams::greedy(2));
    assert!(matches!(e.generate(nul), Err(Error::ChatTemplate(_))));

    // Nothing above disturbed the engine.
    assert_eq!(e.generate(ok()).unwrap()[0].tokens.len(), 4);
}

#[test]
fn engine_settings_out_of_range() {
    let m = tiny_model("llama");
    let bad = |cfg: EngineConfig| Engine::start(cfg).err().map(|e| e.to_string()).unwrap_or_default();
    let base = EngineConfig { model: m.clone(), n_threads: 2, ..Default::default() };
    assert!(bad(EngineConfig { n_parallel: 0, ..base.clone() }).contains("n_parallel"));
    assert!(bad(EngineConfig { n_parallel: 100_000, ..base.clone() }).contains("n_parallel"));
    assert!(bad(EngineConfig { n_ctx: 4, ..base.clone() }).contains("n_ctx"));
}
