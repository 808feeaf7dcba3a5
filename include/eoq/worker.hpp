#pragma once
// Placeholder: the Worker API is being written (issue 3).
