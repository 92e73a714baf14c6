"""The declared dependency ranges are the tested ones, and a model call can never be silently swallowed.

Runs in the pinned environment and (marked ``models``) under the lowest supported transformers.
"""
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import char_tokenizer, tiny_llama
from transformers import LlamaForTokenClassification

from tts_kernels import _ext
from tts_kernels.models import HFPRM, HFPolicy
from tts_kernels.models.compat import SUPPORTED, TRANSFORMERS_MIN, TRANSFORMERS_TESTED_MAX, ForwardArgs, check_transformers
from tts_kernels.search import beam_search

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)
ROOT = Path(__file__).resolve().parents[1]


class NoCacheLM(torch.nn.Module):
    """A causal LM whose forward takes no cache keyword: anything else lands in **kwargs."""

    def __init__(self):
        super().__init__()
        inner = tiny_llama(0)
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, position_ids=None, use_cache=None, **kwargs):  # a cache here would be ignored
        return self.inner(input_ids=input_ids, position_ids=position_ids)

    def set_attn_implementation(self, name):
        self.inner.set_attn_implementation(name)
        self.config = self.inner.config


def test_a_model_without_a_cache_keyword_is_refused():
    tok = char_tokenizer()
    with pytest.raises(TypeError, match=rf"NoCacheLM.forward \(transformers {re.escape(transformers.__version__)}\) "
                                        r"declares no KV cache argument"):
        HFPolicy(NoCacheLM(), tok)
    with pytest.raises(TypeError, match="declares no KV cache argument"):
        beam_search(NoCacheLM(), torch.tensor([[5, 6, 7]]), num_beams=2, max_new_tokens=2, eos_token_id=None,
                    pad_token_id=None)
    prm = tiny_llama(1, cls=LlamaForTokenClassification, num_labels=2)

    class NoCacheBase(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.base(input_ids=input_ids, position_ids=position_ids)

    prm.model = NoCacheBase(prm.model)  # what HFPRM calls is base_model
    with pytest.raises(TypeError, match="NoCacheBase.forward .* declares no KV cache argument"):
        HFPRM(prm, tok, head="classifier")


def test_the_cache_keyword_follows_the_installed_transformers():
    # 5.20 renamed past_key_values to cache; the adapters pick what the model declares.
    model = tiny_llama(0)
    want = "cache" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 20) else "past_key_values"
    assert ForwardArgs(model).cache == want
    assert HFPolicy(model, char_tokenizer()).forward_args.cache == want


def test_undeclared_keywords_are_refused_and_optional_ones_dropped():
    fwd = ForwardArgs(tiny_llama(0).model)  # the base model: no logits_to_keep
    with pytest.raises(TypeError, match=r"does not declare \['not_a_keyword'\]"):
        fwd(None, input_ids=torch.tensor([[1]]), not_a_keyword=1)
    got = fwd("C", input_ids=1, optional={"logits_to_keep": 1, "position_ids": 2})
    assert got == {fwd.cache: "C", "input_ids": 1, "position_ids": 2}


def test_versions_outside_the_range():
    with pytest.raises(ImportError, match=re.escape(SUPPORTED)):
        check_transformers("5.18.0")
    with pytest.warns(RuntimeWarning, match="newer and untested"):
        check_transformers(f"{TRANSFORMERS_TESTED_MAX[0]}.{TRANSFORMERS_TESTED_MAX[1] + 1}.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers(f"{TRANSFORMERS_MIN[0]}.{TRANSFORMERS_MIN[1]}.0")
        check_transformers(transformers.__version__)  # this environment is inside the range
        _ext.check_torch(torch.__version__)
    with pytest.warns(RuntimeWarning, match=r"torch >=2\.13; found 2\.11\.0"):
        _ext.check_torch("2.11.0+cu130")


def test_declared_ranges_match_what_is_tested():
    setup = (ROOT / "setup.py").read_text()
    assert f'TRANSFORMERS = "transformers{SUPPORTED}"' in setup
    assert f'"torch>={_ext.TORCH_MIN[0]}.{_ext.TORCH_MIN[1]}"' in setup
    pins = dict(line.split("==") for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert tuple(int(x) for x in pins["transformers"].split(".")[:2]) == TRANSFORMERS_TESTED_MAX
    assert tuple(int(x) for x in pins["torch"].split(".")[:2]) == _ext.TORCH_MIN
    make = (ROOT / "Makefile").read_text()
    assert f"TF_MIN ?= {TRANSFORMERS_MIN[0]}.{TRANSFORMERS_MIN[1]}.0" in make  # the bottom of the range runs in CI
    assert "test: test-pinned test-min" in make and "make test" in (ROOT / ".ci" / "run").read_text()
