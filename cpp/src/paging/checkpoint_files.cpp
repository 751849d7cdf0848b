// Checkpoint shard reads: pread loops, O_DIRECT where the file system takes it.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "dsfp4/paging.h"

namespace dsfp4 {
namespace paging {

namespace {
constexpr int64_t kDirectAlign = 4096;         // covers 512 B and 4 KiB logical blocks
constexpr int64_t kMaxRead = 16ll << 20;       // bytes per pread call

struct Scratch {  // per-thread aligned buffer for O_DIRECT reads
  uint8_t* p = nullptr;
  int64_t cap = 0;
  ~Scratch() { std::free(p); }
  uint8_t* get(int64_t n) {
    if (n > cap) {
      std::free(p);
      cap = (n + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
      p = static_cast<uint8_t*>(std::aligned_alloc(kDirectAlign, static_cast<size_t>(cap)));
      if (p == nullptr) cap = 0;
    }
    return p;
  }
};
thread_local Scratch t_scratch;

// What identifies a shard as the one the model was loaded from: the tensor offsets and the
// scales checked at load hold for this file only.
struct FileIdentity {
  dev_t dev = 0;
  ino_t ino = 0;
  int64_t size = 0;
  int64_t mtime_ns = 0;
};

FileIdentity identity_of(const struct stat& st) {
  FileIdentity id;
  id.dev = st.st_dev;
  id.ino = st.st_ino;
  id.size = static_cast<int64_t>(st.st_size);
  id.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000ll + st.st_mtim.tv_nsec;
  return id;
}
}  // namespace

struct CheckpointFiles::Impl {
  std::vector<int> fd, dfd;          // buffered and O_DIRECT descriptors (-1: none)
  std::vector<int64_t> size;
  std::vector<FileIdentity> identity;  // recorded at open
  mutable std::mutex mu;
  ReadCounters counters;
  std::vector<int64_t> fault_offset;  // < 0: none
  std::vector<int> fault_errno;
};

Status CheckpointFiles::open(const std::vector<std::string>& paths, bool direct_io,
                             std::unique_ptr<CheckpointFiles>* out) {
  std::unique_ptr<CheckpointFiles> f(new CheckpointFiles());
  f->impl_.reset(new Impl());
  f->paths_ = paths;
  f->direct_ = direct_io;
  Impl& m = *f->impl_;
  for (const std::string& p : paths) {
    const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      for (int x : m.fd) ::close(x);
      for (int x : m.dfd)
        if (x >= 0) ::close(x);
      return InvalidArgument(p + ": cannot be opened (" + std::strerror(err) + ")");
    }
    struct stat st {};
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      const int err = errno;
      const bool regular = S_ISREG(st.st_mode);
      ::close(fd);
      for (int x : m.fd) ::close(x);
      for (int x : m.dfd)
        if (x >= 0) ::close(x);
      return InvalidArgument(p + (regular ? ": cannot be examined (" + std::string(std::strerror(err)) + ")"
                                          : std::string(": is not a regular file")));
    }
    m.fd.push_back(fd);
    m.size.push_back(static_cast<int64_t>(st.st_size));
    m.identity.push_back(identity_of(st));
    int dfd = -1;
#ifdef O_DIRECT
    if (direct_io) dfd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
#endif
    m.dfd.push_back(dfd);
    m.fault_offset.push_back(-1);
    m.fault_errno.push_back(0);
  }
  *out = std::move(f);
  return Status::Ok();
}

CheckpointFiles::~CheckpointFiles() {
  if (!impl_) return;
  for (int x : impl_->fd) ::close(x);
  for (int x : impl_->dfd)
    if (x >= 0) ::close(x);
}

void CheckpointFiles::inject_fault(int file, int64_t offset, int err) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  if (file < 0 || file >= num_files()) return;
  impl_->fault_offset[file] = offset;
  impl_->fault_errno[file] = err;
}

ReadCounters CheckpointFiles::counters() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->counters;
}

void CheckpointFiles::reset_counters() {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->counters = ReadCounters();
}

// "" when file `file` is still the one opened, else how it changed. One fstat on the open
// descriptor (about a microsecond, against reads of kilobytes to megabytes).
static std::string identity_change(int fd, const FileIdentity& was) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return std::string("cannot be examined: ") + std::strerror(errno);
  const FileIdentity now = identity_of(st);
  if (now.dev != was.dev || now.ino != was.ino) return "replaced by another file";
  if (now.size != was.size)
    return "size " + std::to_string(was.size) + " -> " + std::to_string(now.size) + " bytes" +
           (now.size < was.size ? ", truncated" : "");
  if (now.mtime_ns != was.mtime_ns) return "modified";
  return "";
}

Status CheckpointFiles::read(const TensorRange& r, void* dst) {
  if (r.file < 0 || r.file >= num_files()) return InvalidArgument("read: bad file index for tensor " + r.name);
  Impl& m = *impl_;
  const std::string& path = paths_[r.file];
  auto fail = [&](const std::string& why) {
    return Status(StatusCode::kInternal, path + ": reading tensor '" + r.name + "' (bytes " + std::to_string(r.offset) +
                                             ".." + std::to_string(r.offset + r.nbytes) + ") failed: " + why);
  };
  if (r.offset < 0 || r.nbytes < 0) return fail("negative range");
  {
    std::lock_guard<std::mutex> lk(m.mu);
    const int64_t fo = m.fault_offset[r.file];
    if (fo >= 0 && r.offset + r.nbytes > fo) return fail(std::strerror(m.fault_errno[r.file]) + std::string(" (injected)"));
  }
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t device_bytes = 0, reads = 0, direct_reads = 0;

  // pread loop: short reads continue, EINTR retries, EOF before the end is a truncated file.
  auto pread_all = [&](int fd, uint8_t* out, int64_t off, int64_t n, int64_t* got, int* err) {
    *got = 0;
    while (*got < n) {
      const int64_t want = std::min<int64_t>(n - *got, kMaxRead);
      const ssize_t k = ::pread(fd, out + *got, static_cast<size_t>(want), off + *got);
      ++reads;
      if (k < 0) {
        if (errno == EINTR) continue;
        *err = errno;
        return false;
      }
      if (k == 0) break;
      *got += k;
    }
    *err = 0;
    return true;
  };

  // The file must still be the one the model was loaded from; checked after the data is read,
  // so a change before or during the read is seen.
  auto changed = [&]() -> Status {
    const std::string how = identity_change(m.fd[r.file], m.identity[r.file]);
    if (how.empty()) return Status::Ok();
    return fail("the file changed since the model was loaded (" + how + "); reload the model");
  };
  uint8_t* out = static_cast<uint8_t*>(dst);
  bool done = false;
  const int dfd = m.dfd[r.file];
  if (dfd >= 0 && r.nbytes >= kDirectAlign) {
    // Aligned superset of the range through O_DIRECT into scratch, then the interior.
    const int64_t a0 = r.offset / kDirectAlign * kDirectAlign;
    const int64_t a1 = (r.offset + r.nbytes + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    uint8_t* buf = t_scratch.get(a1 - a0);
    if (buf != nullptr) {
      int64_t got = 0;
      int err = 0;
      const uint64_t reads_before = reads;
      if (pread_all(dfd, buf, a0, a1 - a0, &got, &err)) {
        direct_reads += reads - reads_before;
        device_bytes += static_cast<uint64_t>(got);
        if (got < r.offset + r.nbytes - a0) {
          DSFP4_RETURN_IF_ERROR(changed());
          return fail("the file ends at byte " + std::to_string(a0 + got) + " (truncated)");
        }
        std::memcpy(out, buf + (r.offset - a0), static_cast<size_t>(r.nbytes));
        done = true;
      } else if (err != EINVAL) {
        return fail(std::strerror(err));
      }  // EINVAL: this file system refuses O_DIRECT here; fall back to a buffered read
    }
  }
  if (!done) {
    int64_t got = 0;
    int err = 0;
    if (!pread_all(m.fd[r.file], out, r.offset, r.nbytes, &got, &err)) return fail(std::strerror(err));
    device_bytes += static_cast<uint64_t>(got);
    if (got < r.nbytes) {
      DSFP4_RETURN_IF_ERROR(changed());
      return fail("the file ends at byte " + std::to_string(r.offset + got) + " (truncated)");
    }
  }
  DSFP4_RETURN_IF_ERROR(changed());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::lock_guard<std::mutex> lk(m.mu);
  m.counters.bytes += static_cast<uint64_t>(r.nbytes);
  m.counters.device_bytes += device_bytes;
  m.counters.reads += reads;
  m.counters.direct_reads += direct_reads;
  m.counters.seconds += s;
  return Status::Ok();
}

}  // namespace paging
}  // namespace dsfp4
