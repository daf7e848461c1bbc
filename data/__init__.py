"""Data: corpus readers, the embedded demo corpus, features, vocabulary, the prepared-folder store and its
typed records, the prepare pipeline (`preparation`), batching, scoring (docs/design.md section 0 lists the
modules).

Imports nothing of gmot (not `models`, not `gmot_cli`); every other room may import it.
"""
