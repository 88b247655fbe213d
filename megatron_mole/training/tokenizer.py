"""A small byte-level BPE tokenizer trained locally (no hub), saved for transformers.

For the quickstart's tiny Llama base: ``train_tokenizer(texts, out_dir)`` trains a
byte-level BPE with the ``tokenizers`` library and saves it as a transformers fast
tokenizer directory that ``AutoTokenizer.from_pretrained(out_dir)`` loads. Byte-level
means every string is encodable (no unknown token); the 256 byte symbols are part
of the vocabulary whatever the corpus.

Special tokens, in this order (ids 0..5): ``<s>`` (bos), ``</s>`` (eos), ``<pad>``,
and the role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``, which are
whole tokens so the chat format costs one token per turn marker. The chat template
is ``data.DEFAULT_CHAT_TEMPLATE``; plain ``tokenizer(text)`` prepends bos, as
Llama's tokenizer does (the chat template writes bos itself, and the data code
tokenises with ``add_special_tokens=False``).
"""
from pathlib import Path
from typing import Iterable

from megatron_mole.training.data import DEFAULT_CHAT_TEMPLATE

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD) + ROLE_TOKENS


def train_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 512, min_frequency: int = 2):
    """Train on ``texts``, save to ``out_dir`` and return the transformers tokenizer.

    ``vocab_size`` counts the special tokens and the 256 byte symbols, so it must
    exceed 256 + 6; the result may be smaller when the corpus has fewer merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    floor = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size must exceed {floor} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                         f"got {vocab_size}")
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(texts, trainer=trainer)
    model.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, model.token_to_id(BOS))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        additional_special_tokens=list(ROLE_TOKENS))
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
