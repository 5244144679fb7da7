"""Long-context tasks. Each builds prompts in one fixed format, used unchanged for every method.

``TASKS`` maps a task name to ``make(tokenizer, num_tokens, seed) -> TaskSample``.
"""

from dashkv.eval.tasks import needles, passkey, variables, words

TASKS = {
    "passkey": passkey.task_sample,
    "multikey": needles.multikey,
    "multivalue": needles.multivalue,
    "multiquery": needles.multiquery,
    "variable_tracking": variables.variable_tracking,
    "common_words": words.common_words,
}
