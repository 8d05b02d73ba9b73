// Internal: the error type every internal function throws. The C API (cxr_edge.cpp) is the only
// place that catches, so a status code and message travel together from where a problem is found.
#pragma once

#include <stdexcept>
#include <string>

#include "cxr_edge.h"

namespace cxr {

class Error : public std::runtime_error {
public:
    Error(cxr_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    cxr_status status() const noexcept { return status_; }

private:
    cxr_status status_;
};

}  // namespace cxr
