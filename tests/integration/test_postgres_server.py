"""The PostgreSQL server the tests start themselves (``PostgresServer``, ``postgres_url``): it serves SQLAlchemy,
and what it committed survives its crash."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from tests.serving import PostgresServer


def write_and_read(url: str, value: str) -> list[str]:
    """Create table ``t``, insert ``value`` in one committed transaction and read the table back."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE TABLE t (value text NOT NULL)"))
            connection.execute(sa.text("INSERT INTO t (value) VALUES (:value)"), {"value": value})
        return read(engine)
    finally:
        engine.dispose()


def read(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(sa.text("SELECT value FROM t")).scalars())


def test_a_test_gets_an_empty_database_of_its_own(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    assert write_and_read(postgres_url, "héllo") == ["héllo"]


def test_committed_rows_survive_a_crash(tmp_path: Path) -> None:
    with PostgresServer(tmp_path) as server:
        assert write_and_read(server.url, "committed") == ["committed"]
        server.kill()
        server.start()
        engine = sa.create_engine(server.url)
        try:
            assert read(engine) == ["committed"]
        finally:
            engine.dispose()
