"""SmolLM2-135M-Instruct (real weights): the generate bundle with policy "full" reproduces transformers —
same 64 greedy tokens on 3 prompts, logits within 1e-3 at every step. The bundle export is cached in
``$EDGE_SEL_HOME/test-bundles`` (export + verify take minutes; the bundle is reused while its layout matches)."""

import numpy as np
import pytest

from edge_sel.runtime.generate import Generator

pytestmark = pytest.mark.real

PROMPTS = [("What is the capital of France?", True), ("Write a short poem about the ocean.", True),
           ("The history of the Roman Empire", False)]


@pytest.fixture(scope="module")
def smol():
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.errors import BundleError
    from edge_sel.export import export
    from edge_sel.export.adapters import adapter_for
    from edge_sel.runtime.home import home
    from edge_sel.export.sources import fetch, resolve

    fetch("smollm2-135m-instruct", quiet=True)
    path = home() / "test-bundles" / "smollm2-135m-instruct-generate"
    try:
        b = Bundle.open(path)
        ok = b.task == "generate" and b.manifest.get("layer_io", {}).get("attn", {}).get("outputs") == ["hidden_out", "attn_sum", "attn_max"]
    except BundleError:
        ok = False
    if not ok:
        export("smollm2-135m-instruct", path, task="generate", overwrite=True)
    model, tok = adapter_for("llama").load(resolve("smollm2-135m-instruct"), "yes_no", 0)
    return path, model, tok


def test_smollm2_full_policy_matches_transformers_for_64_tokens(smol):
    from edge_sel.export.adapters import adapter_for

    path, model, tok = smol
    gen = Generator(path, policy="full")
    for prompt, chat in PROMPTS:
        res = gen.generate(prompt, max_new_tokens=64, chat=chat, stop=False, return_logits=True)
        hf_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True) if chat \
            else tok(prompt)["input_ids"]
        assert list(hf_ids) == res.prompt_ids  # the runtime's tokenizer + template equal transformers'
        ref = adapter_for("llama").reference_logits(model, res.prompt_ids, res.tokens[:-1])
        assert len(res.tokens) == 64
        assert res.tokens == [int(np.argmax(r)) for r in ref]
        assert np.max(np.abs(np.stack(res.logits) - ref)) < 1e-3
    assert "Paris" in gen.generate(PROMPTS[0][0], max_new_tokens=16, chat=True).text
    gen.close()
