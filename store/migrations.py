"""Numbered schema migrations, each applied once inside a transaction."""

from __future__ import annotations

import logging
from typing import NamedTuple

import aiosqlite

log = logging.getLogger(__name__)


class Migration(NamedTuple):
    version: int
    name: str
    sql: str
    # SQLite cannot change a CHECK constraint in place: such a migration rebuilds the table, which needs
    # foreign keys off for its duration (checked with foreign_key_check before it commits).
    rebuilds_tables: bool = False

    def statements(self) -> list[str]:
        """The migration's statements (no semicolons inside our string literals)."""
        lines = [ln for ln in self.sql.splitlines() if not ln.strip().startswith("--")]
        return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# Append only: a released migration is never edited.
MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "initial",
        """
        CREATE TABLE kernels (
            name             TEXT PRIMARY KEY,
            base_model       TEXT NOT NULL,
            description      TEXT NOT NULL DEFAULT '',
            config           TEXT NOT NULL,
            deployed_version INTEGER,
            status           TEXT NOT NULL DEFAULT 'active'
                             CHECK (status IN ('active', 'converged', 'paused')),
            created_at       TEXT NOT NULL,
            updated_at       TEXT NOT NULL
        );

        CREATE TABLE runs (
            id               TEXT PRIMARY KEY,
            kernel           TEXT NOT NULL REFERENCES kernels(name),
            status           TEXT NOT NULL CHECK (status IN ('queued', 'requested', 'running',
                             'evaluating', 'deployed', 'rejected', 'failed', 'cancelled')),
            trigger          TEXT NOT NULL DEFAULT 'manual' CHECK (trigger IN ('manual', 'auto')),
            phase            TEXT,
            step             INTEGER,
            total_steps      INTEGER,
            progress         REAL,
            loss             REAL,
            tokens_per_s     REAL,
            eta_s            REAL,
            message          TEXT,
            n_new            INTEGER NOT NULL DEFAULT 0,
            n_replay         INTEGER NOT NULL DEFAULT 0,
            base_version     INTEGER,
            new_version      INTEGER,
            metrics          TEXT,
            gates            TEXT,
            error            TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            events_offset    INTEGER NOT NULL DEFAULT 0,
            created_at       TEXT NOT NULL,
            requested_at     TEXT,
            started_at       TEXT,
            finished_at      TEXT,
            updated_at       TEXT NOT NULL
        );
        CREATE INDEX runs_kernel_status ON runs(kernel, status);
        CREATE INDEX runs_status_created ON runs(status, created_at);

        CREATE TABLE experiences (
            id              INTEGER PRIMARY KEY,
            kernel          TEXT NOT NULL REFERENCES kernels(name),
            prompt          TEXT NOT NULL,
            response        TEXT NOT NULL,
            system          TEXT,
            key_answer      TEXT,
            paraphrases     TEXT NOT NULL DEFAULT '[]',
            source          TEXT NOT NULL CHECK (source IN ('agent', 'correction', 'import')),
            status          TEXT NOT NULL DEFAULT 'new'
                            CHECK (status IN ('new', 'trained', 'needs_improvement', 'excluded')),
            priority        REAL NOT NULL DEFAULT 1.0,
            idempotency_key TEXT,
            content_hash    TEXT NOT NULL,
            trained_run_id  TEXT REFERENCES runs(id),
            last_loss       REAL,
            interaction_id  INTEGER REFERENCES interactions(id),
            created_at      TEXT NOT NULL,
            updated_at      TEXT NOT NULL
        );
        CREATE UNIQUE INDEX experiences_key ON experiences(kernel, idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        CREATE UNIQUE INDEX experiences_hash ON experiences(kernel, content_hash);
        CREATE INDEX experiences_kernel_status ON experiences(kernel, status);

        -- Which experiences a run was given, so a deploy marks exactly those as trained.
        CREATE TABLE run_items (
            run_id        TEXT NOT NULL REFERENCES runs(id),
            experience_id INTEGER NOT NULL REFERENCES experiences(id),
            role          TEXT NOT NULL CHECK (role IN ('new', 'replay')),
            PRIMARY KEY (run_id, experience_id)
        );

        CREATE TABLE run_events (
            id           INTEGER PRIMARY KEY,
            run_id       TEXT NOT NULL REFERENCES runs(id),
            seq          INTEGER NOT NULL,
            ts           TEXT NOT NULL,
            phase        TEXT NOT NULL,
            step         INTEGER,
            total_steps  INTEGER,
            epoch        REAL,
            loss         REAL,
            tokens_per_s REAL,
            eta_s        REAL,
            message      TEXT,
            UNIQUE (run_id, seq)
        );

        CREATE TABLE versions (
            kernel      TEXT NOT NULL REFERENCES kernels(name),
            version     INTEGER NOT NULL,
            run_id      TEXT REFERENCES runs(id),
            path        TEXT NOT NULL,
            metrics     TEXT,
            status      TEXT NOT NULL DEFAULT 'available'
                        CHECK (status IN ('available', 'deployed', 'retired', 'pruned')),
            converged   INTEGER NOT NULL DEFAULT 0,
            created_at  TEXT NOT NULL,
            deployed_at TEXT,
            PRIMARY KEY (kernel, version)
        );

        CREATE TABLE interactions (
            id                       INTEGER PRIMARY KEY,
            kernel                   TEXT NOT NULL REFERENCES kernels(name),
            version                  INTEGER,
            prompt                   TEXT NOT NULL,
            system                   TEXT,
            response                 TEXT NOT NULL,
            latency_ms               REAL,
            rating                   INTEGER,
            correction               TEXT,
            correction_experience_id INTEGER REFERENCES experiences(id),
            created_at               TEXT NOT NULL,
            feedback_at              TEXT
        );
        CREATE INDEX interactions_kernel ON interactions(kernel, created_at);

        CREATE TABLE quarantine (
            id          INTEGER PRIMARY KEY,
            original    TEXT NOT NULL,
            stored_as   TEXT NOT NULL,
            reason      TEXT NOT NULL,
            created_at  TEXT NOT NULL
        );
        """,
    ),
    Migration(
        2,
        "feedback_curriculum",
        """
        -- Answers an agent rated good become 'feedback' experiences (gold examples for replay).
        CREATE TABLE experiences_new (
            id              INTEGER PRIMARY KEY,
            kernel          TEXT NOT NULL REFERENCES kernels(name),
            prompt          TEXT NOT NULL,
            response        TEXT NOT NULL,
            system          TEXT,
            key_answer      TEXT,
            paraphrases     TEXT NOT NULL DEFAULT '[]',
            source          TEXT NOT NULL CHECK (source IN ('agent', 'correction', 'import', 'feedback')),
            status          TEXT NOT NULL DEFAULT 'new'
                            CHECK (status IN ('new', 'trained', 'needs_improvement', 'excluded')),
            priority        REAL NOT NULL DEFAULT 1.0,
            idempotency_key TEXT,
            content_hash    TEXT NOT NULL,
            trained_run_id  TEXT REFERENCES runs(id),
            last_loss       REAL,
            interaction_id  INTEGER REFERENCES interactions(id),
            created_at      TEXT NOT NULL,
            updated_at      TEXT NOT NULL
        );
        INSERT INTO experiences_new SELECT * FROM experiences;
        DROP TABLE experiences;
        ALTER TABLE experiences_new RENAME TO experiences;
        CREATE UNIQUE INDEX experiences_key ON experiences(kernel, idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        CREATE UNIQUE INDEX experiences_hash ON experiences(kernel, content_hash);
        CREATE INDEX experiences_kernel_status ON experiences(kernel, status);

        -- What feedback made of an answer: gold, needs_improvement, corrected, or neutral.
        ALTER TABLE interactions ADD COLUMN verdict TEXT
            CHECK (verdict IN ('gold', 'needs_improvement', 'corrected', 'neutral'));
        CREATE INDEX interactions_review ON interactions(kernel, verdict, rating);

        -- Failed runs before this moment do not count towards the circuit breaker.
        ALTER TABLE kernels ADD COLUMN breaker_reset_at TEXT;
        """,
        rebuilds_tables=True,
    ),
    Migration(
        3,
        "one_active_run_per_kernel",
        """
        -- Two servers on one home could each start a run for one kernel. Keep the oldest active run of
        -- each kernel and close the others, so the unique index below can hold from now on.
        UPDATE runs SET status = 'failed', phase = 'failed', eta_s = NULL,
            error = 'closed when engrain was upgraded: another run of this kernel was already active',
            finished_at = COALESCE(finished_at, updated_at)
        WHERE status IN ('queued', 'requested', 'running', 'evaluating')
          AND EXISTS (
            SELECT 1 FROM runs AS older
            WHERE older.kernel = runs.kernel
              AND older.status IN ('queued', 'requested', 'running', 'evaluating')
              AND (older.created_at < runs.created_at OR (older.created_at = runs.created_at AND older.id < runs.id))
          );
        CREATE UNIQUE INDEX runs_one_active ON runs(kernel)
            WHERE status IN ('queued', 'requested', 'running', 'evaluating');
        """,
    ),
    Migration(
        4,
        "learning_without_overwriting",
        """
        -- A correction supersedes the experience it corrects, and a wrong experience can be retired: either
        -- way it leaves training, replay and the regression tests, and stays, linked, for provenance.
        CREATE TABLE experiences_new (
            id              INTEGER PRIMARY KEY,
            kernel          TEXT NOT NULL REFERENCES kernels(name),
            prompt          TEXT NOT NULL,
            response        TEXT NOT NULL,
            system          TEXT,
            key_answer      TEXT,
            paraphrases     TEXT NOT NULL DEFAULT '[]',
            source          TEXT NOT NULL CHECK (source IN ('agent', 'correction', 'import', 'feedback')),
            status          TEXT NOT NULL DEFAULT 'new'
                            CHECK (status IN ('new', 'trained', 'needs_improvement', 'excluded', 'superseded',
                            'retired')),
            priority        REAL NOT NULL DEFAULT 1.0,
            idempotency_key TEXT,
            content_hash    TEXT NOT NULL,
            trained_run_id  TEXT REFERENCES runs(id),
            last_loss       REAL,
            interaction_id  INTEGER REFERENCES interactions(id),
            created_at      TEXT NOT NULL,
            updated_at      TEXT NOT NULL,
            superseded_by   INTEGER REFERENCES experiences(id),
            retired_reason  TEXT
        );
        INSERT INTO experiences_new SELECT *, NULL, NULL FROM experiences;
        DROP TABLE experiences;
        ALTER TABLE experiences_new RENAME TO experiences;
        CREATE UNIQUE INDEX experiences_key ON experiences(kernel, idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        CREATE UNIQUE INDEX experiences_hash ON experiences(kernel, content_hash);
        CREATE INDEX experiences_kernel_status ON experiences(kernel, status);
        CREATE INDEX experiences_prompt ON experiences(kernel, prompt);

        -- What a run lost (earlier facts and must-keep facts), each with the new fact that overwrote it.
        ALTER TABLE runs ADD COLUMN lost TEXT;

        -- The learning defaults changed (growing adapters, null-space updates, must-keep and retention gates).
        -- Kernels still on the old defaults follow the new ones: from now on a config stores only what differs
        -- from the defaults. min_retention_em (exact match on a sample) became min_retention_kept (the share of
        -- earlier facts the replaced version knew that are still known); a changed threshold carries over.
        UPDATE kernels SET config = json_set(config, '$.train', json('{}'))
            WHERE json_extract(config, '$.train.learning_rate') = 0.001
              AND json_extract(config, '$.train.max_epochs') = 16
              AND json_extract(config, '$.train.batch_size') = 8
              AND json_extract(config, '$.train.replay_ratio') = 1.0
              AND json_extract(config, '$.train.anchor_ratio') = 1.0
              AND json_extract(config, '$.train.kl_weight') = 1.0
              AND json_extract(config, '$.train.ewc_lambda') = 0.0
              AND json_extract(config, '$.train.adapter.rank') = 16
              AND json_extract(config, '$.train.replay_strategy') = 'uniform';
        UPDATE kernels SET config = json_set(config, '$.gates', json('{}'))
            WHERE json_extract(config, '$.gates.min_acquisition_em') = 0.8
              AND json_extract(config, '$.gates.min_retention_em') = 0.8
              AND json_extract(config, '$.gates.min_anchor_agreement') = 0.3
              AND json_extract(config, '$.gates.min_general_kept') = 0.75
              AND json_extract(config, '$.gates.max_ppl_ratio') = 1.15
              AND json_extract(config, '$.gates.min_schema_compliance') = 1.0
              AND json_extract(config, '$.gates.min_paraphrase_em') IS NULL;
        UPDATE kernels SET config = json_remove(
                json_set(config, '$.gates.min_retention_kept', json_extract(config, '$.gates.min_retention_em')),
                '$.gates.min_retention_em')
            WHERE json_extract(config, '$.gates.min_retention_em') IS NOT NULL;
        """,
        rebuilds_tables=True,
    ),
]


async def apply_migrations(db: aiosqlite.Connection, clock_iso: str) -> int:
    """Bring the schema up to date; return the resulting schema version."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    [row] = await db.execute_fetchall("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    current = int(row[0])
    newest = MIGRATIONS[-1].version
    if current > newest:
        raise RuntimeError(
            f"database schema is version {current}, newer than this engrain knows ({newest}); "
            "upgrade engrain or point ENGRAIN_HOME at another directory"
        )
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        if migration.rebuilds_tables:
            await db.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction, so before BEGIN
        # executescript would commit on its own; run statement by statement inside one transaction.
        await db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have applied it since we looked (callers also hold the home's db lock).
            [row] = await db.execute_fetchall("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            if int(row[0]) >= migration.version:
                await db.commit()
                current = int(row[0])
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            for statement in migration.statements():
                await db.execute(statement)
            if migration.rebuilds_tables:
                broken = list(await db.execute_fetchall("PRAGMA foreign_key_check"))
                if broken:
                    raise RuntimeError(f"migration {migration.version} would break foreign keys: {broken[:5]}")
            await db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, clock_iso),
            )
            await db.commit()
        except BaseException:
            await db.rollback()
            raise
        finally:
            if migration.rebuilds_tables:
                await db.execute("PRAGMA foreign_keys=ON")
        current = migration.version
    return current
