"""LLaVA-1.5's instruction suffixes, one definition for every package that writes or strips them.

The conversation templates (``tuna.conversation``) re-export them; they live here, below every package,
because the synthetic world (``datastore.synth``) writes them into its instruction data too.
"""

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
