"""The meta stores' two interfaces and the table that chooses a store, without servers (test_meta_store.py runs
the stores' contract on real sqlite, MySQL and etcd)."""
from __future__ import annotations

import inspect

import pytest

import milvus_cdc as m

EXPECTED = {m.StoreType.SQLITE: m.SqliteMetaStore, m.StoreType.MYSQL: m.MySQLMetaStore,
            m.StoreType.ETCD: m.EtcdMetaStore}


def test_the_table_maps_each_store_type_to_its_class():
    assert m.META_STORES == EXPECTED
    assert set(m.META_STORES) == set(m.StoreType), "a store type without a store, or a store without a type"


@pytest.mark.parametrize("store_class", list(EXPECTED.values()))
def test_every_store_implements_every_method_of_the_task_store(store_class):
    assert issubclass(store_class, m.TaskStore) and not inspect.isabstract(store_class)
    for name in m.TaskStore.__abstractmethods__:
        assert not getattr(getattr(store_class, name), "__isabstractmethod__", False), f"{store_class}.{name}"


@pytest.mark.parametrize("store_class", [m.MySQLMetaStore, m.EtcdMetaStore])
def test_the_stores_that_share_tasks_implement_every_method_of_the_lease_store(store_class):
    assert issubclass(store_class, m.LeaseStore)
    for name in m.LeaseStore.__abstractmethods__:
        assert not getattr(getattr(store_class, name), "__isabstractmethod__", False), f"{store_class}.{name}"
        assert getattr(store_class, name) is not getattr(m.LeaseStore, name)


def test_sqlite_has_no_leases_to_give():
    """sqlite is for one server: it is no LeaseStore, rather than one whose lease methods all fail."""
    assert not issubclass(m.SqliteMetaStore, m.LeaseStore)


def test_the_interfaces_stay_small():
    assert m.TaskStore.__abstractmethods__ == {"ping", "create_task", "save_task", "update_task", "load_tasks",
                                               "delete_task", "save_checkpoints", "load_checkpoints", "close"}
    assert m.LeaseStore.__abstractmethods__ == {"join", "renew", "servers", "acquire", "release", "owners",
                                                "leave"}


def test_every_method_of_the_interfaces_states_its_contract():
    for interface in (m.TaskStore, m.LeaseStore):
        assert "MetaStoreUnavailable" in (interface.__doc__ or "")
        for name in interface.__abstractmethods__:
            assert inspect.getdoc(getattr(interface, name)), f"{interface.__name__}.{name} has no contract"


def test_open_meta_store_opens_the_store_of_its_type(tmp_path):
    store = m.open_meta_store(m.MetaStoreSettings(m.StoreType.SQLITE, "cdc", sqlite_path=str(tmp_path / "m.db")))
    try:
        assert type(store) is m.SqliteMetaStore
        assert store.create_task("t1", {"task_id": "t1"}) and store.load_tasks() == {"t1": {"task_id": "t1"}}
    finally:
        store.close()


def test_open_meta_store_refuses_a_type_it_has_no_store_for(tmp_path):
    """It chose etcd for every word it did not know (issue 18, item 4); load_config refuses those first, this is
    for settings made in code."""
    settings = m.MetaStoreSettings("redis", "cdc", sqlite_path=str(tmp_path / "m.db"))
    with pytest.raises(m.ConfigError, match="must be one of sqlite, mysql, etcd, got 'redis'"):
        m.open_meta_store(settings)


def test_an_etcd_store_without_etcd_settings_is_a_config_error():
    with pytest.raises(m.ConfigError, match="metaStoreConfig.etcd"):
        m.open_meta_store(m.MetaStoreSettings(m.StoreType.ETCD, "cdc"))
