//! Chat templates, checked against an implementation we did not write: for the fixture models whose
//! GGUF template llama.cpp recognises (ChatML in the Qwen fixtures, Llama 2 in the Llama one), the
//! GGUF's Jinja rendered by minijinja must give exactly llama.cpp's built-in rendering, token for
//! token, on the conversations both cover (the Llama fixture's template renders user turns only,
//! with its own `{{ bos_token }}`, which must not add a second BOS); a
//! Jinja template's `raise_exception` reaches the caller as its own words; the demo model ships its
//! prompt format as a template (the instruction alone).

use std::path::PathBuf;

use iapt_engine::{ChatError, ChatTemplate};
use iapt_llama::{Model, Token};

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../converters/python")
}

fn tokens(model: &Model, t: &ChatTemplate, msgs: &[(&str, &str)]) -> Vec<Token> {
    let r = t.render(model, msgs).expect("render");
    model.tokenize(&r.text, r.add_special, true).expect("tokenize")
}

#[test]
fn jinja_renders_the_gguf_templates_as_llama_cpp_does() {
    let conv = [("system", "be brief"), ("user", "alpha"), ("assistant", "beta"), ("user", "gamma")];
    for (name, builtin) in [("qwen2-tiny-f32", "chatml"), ("qwen3-tiny-f32", "chatml"), ("llama-tiny-f32", "llama2")] {
        let model = Model::load(&assets().join(format!("fixtures/models/{name}.gguf"))).expect("model");
        let source = model.chat_template().expect("the fixture has a template");
        assert!(iapt_llama::apply_chat_template_named(&source, &[("user", "x")]).is_ok(), "{name}: llama.cpp recognises it");
        let native = ChatTemplate::from_arg(builtin).unwrap();
        let jinja = ChatTemplate::from_model(&model).unwrap().unwrap();
        assert!(jinja.origin().contains("Jinja"), "{name}: {}", jinja.origin());
        let convs: Vec<&[(&str, &str)]> = match builtin {
            "chatml" => vec![&conv[1..2], &conv[..2], &conv[..]],
            // The fixture's Llama 2 template renders user turns only.
            _ => vec![&conv[1..2]],
        };
        for msgs in convs {
            let (a, b) = (tokens(&model, &native, msgs), tokens(&model, &jinja, msgs));
            assert_eq!(a, b, "{name} {msgs:?}: llama.cpp {:?} vs Jinja {:?}", native.render(&model, msgs), jinja.render(&model, msgs));
            assert_eq!(a.iter().filter(|&&t| Some(t) == model.bos()).count(), usize::from(model.add_bos()), "{name}: one BOS");
        }
    }
}

#[test]
fn a_builtin_name_overrides_the_model() {
    let model = Model::load(&assets().join("fixtures/models/llama-tiny-f32.gguf")).expect("model");
    let chatml = ChatTemplate::resolve(Some("chatml"), &model).unwrap();
    let text = chatml.render(&model, &[("user", "hi")]).unwrap().text;
    // ChatML as OpenAI documented it.
    assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn the_demo_model_ships_its_prompt_format() {
    let model = Model::load(&assets().join("demo/assets/base-q4_k_m.gguf")).expect("demo model");
    let t = ChatTemplate::resolve(None, &model).unwrap();
    assert!(t.origin().contains("Jinja"), "{}", t.origin());
    let instruction = "write the list backwards: nest queen cake jam";
    let r = t.render(&model, &[("user", instruction)]).unwrap();
    // prompt_format.json: [BOS] + the instruction's tokens, as a completions prompt.
    assert_eq!(model.tokenize(&r.text, r.add_special, true).unwrap(), model.tokenize(instruction, true, false).unwrap());
    let e = t.render(&model, &[("system", "x"), ("user", instruction)]).unwrap_err();
    assert!(matches!(&e, ChatError::Render { detail } if detail.contains("exactly one user message")), "{e}");
}
