#pragma once
#include <eoq/errors.hpp>
#include <eoq/memory_store.hpp>
#include <eoq/postgres_store.hpp>
#include <eoq/scheduler.hpp>
#include <eoq/task.hpp>
#include <eoq/task_store.hpp>
