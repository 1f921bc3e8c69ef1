"""Rule and episode memory (Chroma), memory graph (networkx), router memory features.

Modules, one idea each:
    config      MemoryConfig: run dir or server URL, dedup/similarity thresholds, k, n_experts;
                ``feature_dim`` (= embed_dim + n_experts) is the router's memory input size
    embedding   MiniLMEmbedding (all-MiniLM-L6-v2 from the offline package) and HashEmbedding
                (deterministic, for tests), both registered Chroma embedding functions
    records     Rule, Episode, NewRule, Provenance, RuleHit, MemoryStats, MemoryFeatures
    store       MemoryStore: open, add_rule(s), add_episode, counters, status, training,
                list/search/show rules, memory_features, stats
    base        StoreBase, what MemoryStore stands on: close, the write discipline (thread lock,
                io lock, dirty marker, autosave), graph load/rebuild/flush, paged reads
    opening     the three ways a store opens (server URL, embedded writer, read-only snapshot)
                and the check of its collections
    dedup       whether a new rule is new or merges into a near-duplicate (dedup_threshold)
    graph_file  memory_graph.json and graph.dirty: trusting, saving, marking
    chroma      Chroma's cosine distance as similarity, its failures as MemoryStoreError
    graph       MemoryGraph: problems, rules, experts, episodes, updates; atomic node-link JSON
    features    turns the nearest episodes and rules into the router vector and the expert prior
    filters     where-filter validation with one-line errors
    locks       one writer per embedded store (flock), consistent snapshots for readers
    server      a local `chroma run` for tests and benchmarks
    errors      WriterLockedError, UnknownIdError, BadFilterError, ReadOnlyError

Typical use::

    store = MemoryStore.open(MemoryConfig(run_dir="runs/r1"))  # embedded, writable
    rule_id, merged = store.add_rule(text, problem_id="p7", cycle=2, episode_id=ep_id)
    features = store.memory_features(question)  # .vector, .prior, .rules
    store.close()
"""
