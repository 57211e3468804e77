// Kernel lab: variants of the batch-1 bitmask + bf16 sparse GEMV row loop, timed interleaved on one
// thread (random weights at the given sparsity, bf16 values, float32 x; X1 rounds x to bf16). Used to find
// out what bounds the AVX-512 loops (A+pf = row_avx512, X1+pf = row_bf16dot in
// src/losa/inference/csrc/sparse_linear.cpp).
// Build and run (needs an AVX-512 VBMI2 + BF16 CPU):
//   g++ -O3 -std=c++17 -o /tmp/kernel_variants benchmarks/kernel_variants.cpp
//   /tmp/kernel_variants 11008 4096 0.7
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <random>
#include <chrono>
#include <algorithm>
#include <cmath>
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,popcnt,avx512bf16")))
typedef uint16_t bf;
static inline float b2f(bf v){uint32_t u=uint32_t(v)<<16;float f;memcpy(&f,&u,4);return f;}
static inline bf f2b(float f){uint32_t u;memcpy(&u,&f,4);return bf(u>>16);}
struct M { int N,K,nb; std::vector<uint32_t> meta; std::vector<bf> vals; std::vector<int64_t> rp;
  std::vector<uint32_t> il; std::vector<int64_t> ilrp; std::vector<float> dense; };
T512 static inline __m512 widen16(const bf* v){return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)v)),16));}
// A: the float32-x loop (shipped with the prefetch of A+pf)
T512 float rowA(const uint32_t* meta,const bf* v,const float* x,int nb){
  __m512 a0=_mm512_setzero_ps(),a1=a0;
  for(int k=0;k<nb;++k){uint32_t m=meta[k];uint32_t m0=m&0xffff,m1=m>>16;int c0=_mm_popcnt_u32(m0);
    __m512 r0=widen16(v),r1=widen16(v+c0);
    __m512 w0=_mm512_maskz_expand_ps(m0,r0),w1=_mm512_maskz_expand_ps(m1,r1);
    a0=_mm512_fmadd_ps(w0,_mm512_loadu_ps(x+32*k),a0);a1=_mm512_fmadd_ps(w1,_mm512_loadu_ps(x+32*k+16),a1);v+=_mm_popcnt_u32(m);}
  return _mm512_reduce_add_ps(_mm512_add_ps(a0,a1));}
// B: 2-block unroll, 4 acc
T512 float rowB(const uint32_t* meta,const bf* v,const float* x,int nb){
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;int k=0;
  for(;k+1<nb;k+=2){uint64_t mm; memcpy(&mm,meta+k,8);
    uint32_t m=uint32_t(mm),n=uint32_t(mm>>32);
    int c0=_mm_popcnt_u32(m&0xffff),c=_mm_popcnt_u32(m),d0=_mm_popcnt_u32(n&0xffff);
    __m512 r0=widen16(v),r1=widen16(v+c0),r2=widen16(v+c),r3=widen16(v+c+d0);
    a0=_mm512_fmadd_ps(_mm512_maskz_expand_ps(m&0xffff,r0),_mm512_loadu_ps(x+32*k),a0);
    a1=_mm512_fmadd_ps(_mm512_maskz_expand_ps(m>>16,r1),_mm512_loadu_ps(x+32*k+16),a1);
    a2=_mm512_fmadd_ps(_mm512_maskz_expand_ps(n&0xffff,r2),_mm512_loadu_ps(x+32*k+32),a2);
    a3=_mm512_fmadd_ps(_mm512_maskz_expand_ps(n>>16,r3),_mm512_loadu_ps(x+32*k+48),a3);
    v+=_mm_popcnt_u64(mm);}
  for(;k<nb;++k){uint32_t m=meta[k];int c0=_mm_popcnt_u32(m&0xffff);
    a0=_mm512_fmadd_ps(_mm512_maskz_expand_ps(m&0xffff,widen16(v)),_mm512_loadu_ps(x+32*k),a0);
    a1=_mm512_fmadd_ps(_mm512_maskz_expand_ps(m>>16,widen16(v+c0)),_mm512_loadu_ps(x+32*k+16),a1);v+=_mm_popcnt_u32(m);}
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0,a1),_mm512_add_ps(a2,a3)));}
// C: interleaved dwords (lo-half value in low word, hi-half value in high word), per block max(c0,c1) dwords
T512 float rowC(const uint32_t* meta,const uint32_t* v,const float* x,int nb){
  __m512 a0=_mm512_setzero_ps(),a1=a0; const __m512i hm=_mm512_set1_epi32(0xffff0000);
  for(int k=0;k<nb;++k){uint32_t m=meta[k];uint32_t m0=m&0xffff,m1=m>>16;
    __m512i d=_mm512_loadu_si512(v);
    __m512 r0=_mm512_castsi512_ps(_mm512_slli_epi32(d,16)),r1=_mm512_castsi512_ps(_mm512_and_si512(d,hm));
    a0=_mm512_fmadd_ps(_mm512_maskz_expand_ps(m0,r0),_mm512_loadu_ps(x+32*k),a0);
    a1=_mm512_fmadd_ps(_mm512_maskz_expand_ps(m1,r1),_mm512_loadu_ps(x+32*k+16),a1);
    v+=std::max(_mm_popcnt_u32(m0),_mm_popcnt_u32(m1));}
  return _mm512_reduce_add_ps(_mm512_add_ps(a0,a1));}
// D: compress x, merge halves, one widen + one FMA when c<=16
T512 float rowD(const uint32_t* meta,const bf* v,const float* x,int nb){
  __m512 a0=_mm512_setzero_ps(),a1=a0;
  for(int k=0;k<nb;++k){uint32_t m=meta[k];uint32_t m0=m&0xffff,m1=m>>16;int c0=_mm_popcnt_u32(m0),c=_mm_popcnt_u32(m);
    __m512 xa=_mm512_maskz_compress_ps(m0,_mm512_loadu_ps(x+32*k)),xb=_mm512_maskz_compress_ps(m1,_mm512_loadu_ps(x+32*k+16));
    if(__builtin_expect(c<=16,1)){uint32_t mk=((1u<<c)-1)^((1u<<c0)-1);
      __m512 xc=_mm512_mask_expand_ps(xa,(__mmask16)mk,xb);
      a0=_mm512_fmadd_ps(widen16(v),xc,a0);}
    else{a0=_mm512_fmadd_ps(widen16(v),xa,a0);a1=_mm512_fmadd_ps(widen16(v+c0),xb,a1);}
    v+=c;}
  return _mm512_reduce_add_ps(_mm512_add_ps(a0,a1));}
// E: D with 2 accumulators alternating blocks
T512 float rowE(const uint32_t* meta,const bf* v,const float* x,int nb){
  __m512 a0=_mm512_setzero_ps(),a1=a0;int k=0;
  auto blk=[&](int k,__m512& acc) T512 {uint32_t m=meta[k];uint32_t m0=m&0xffff,m1=m>>16;int c0=_mm_popcnt_u32(m0),c=_mm_popcnt_u32(m);
    __m512 xa=_mm512_maskz_compress_ps(m0,_mm512_loadu_ps(x+32*k)),xb=_mm512_maskz_compress_ps(m1,_mm512_loadu_ps(x+32*k+16));
    if(__builtin_expect(c<=16,1)){uint32_t mk=((1u<<c)-1)^((1u<<c0)-1);
      acc=_mm512_fmadd_ps(widen16(v),_mm512_mask_expand_ps(xa,(__mmask16)mk,xb),acc);}
    else{acc=_mm512_fmadd_ps(widen16(v),xa,acc);acc=_mm512_fmadd_ps(widen16(v+c0),xb,acc);}
    v+=c;};
  for(;k+1<nb;k+=2){blk(k,a0);blk(k+1,a1);} if(k<nb)blk(k,a0);
  return _mm512_reduce_add_ps(_mm512_add_ps(a0,a1));}
T512 float rowP0(const uint32_t* meta,const bf* v,const float* x,int nb){ // no expand
  __m512 a0=_mm512_setzero_ps(),a1=a0;
  for(int k=0;k<nb;++k){uint32_t m=meta[k];uint32_t m0=m&0xffff;int c0=_mm_popcnt_u32(m0);
    __m512 r0=widen16(v),r1=widen16(v+c0);
    a0=_mm512_fmadd_ps(r0,_mm512_loadu_ps(x+32*k),a0);a1=_mm512_fmadd_ps(r1,_mm512_loadu_ps(x+32*k+16),a1);v+=_mm_popcnt_u32(m);}
  return _mm512_reduce_add_ps(_mm512_add_ps(a0,a1));}
template<int PD>
T512 float rowAP(const uint32_t* meta,const bf* v,const float* x,int nb){
  __m512 a0=_mm512_setzero_ps(),a1=a0;
  for(int k=0;k<nb;++k){uint32_t m=meta[k];uint32_t m0=m&0xffff,m1=m>>16;int c0=_mm_popcnt_u32(m0);
    _mm_prefetch((const char*)(v+PD),_MM_HINT_T0); if((k&15)==0)_mm_prefetch((const char*)(meta+k+PD/8),_MM_HINT_T0);
    __m512 r0=widen16(v),r1=widen16(v+c0);
    __m512 w0=_mm512_maskz_expand_ps(m0,r0),w1=_mm512_maskz_expand_ps(m1,r1);
    a0=_mm512_fmadd_ps(w0,_mm512_loadu_ps(x+32*k),a0);a1=_mm512_fmadd_ps(w1,_mm512_loadu_ps(x+32*k+16),a1);v+=_mm_popcnt_u32(m);}
  return _mm512_reduce_add_ps(_mm512_add_ps(a0,a1));}
// W: expand in 16-bit domain (one vpexpandw per 32 inputs), widen with unpack vs zero; x pre-permuted
T512 float rowW(const uint32_t* meta,const bf* v,const float* xp,int nb){
  __m512 a0=_mm512_setzero_ps(),a1=a0; const __m512i z=_mm512_setzero_si512();
  for(int k=0;k<nb;++k){uint32_t m=meta[k];
    __m512i r=_mm512_loadu_si512(v); asm("":"+v"(r));
    __m512i e=_mm512_maskz_expand_epi16(m,r);
    __m512 lo=_mm512_castsi512_ps(_mm512_unpacklo_epi16(z,e)),hi=_mm512_castsi512_ps(_mm512_unpackhi_epi16(z,e));
    a0=_mm512_fmadd_ps(lo,_mm512_loadu_ps(xp+32*k),a0);a1=_mm512_fmadd_ps(hi,_mm512_loadu_ps(xp+32*k+16),a1);v+=_mm_popcnt_u32(m);}
  return _mm512_reduce_add_ps(_mm512_add_ps(a0,a1));}
// X: vpexpandw + vdpbf16ps with x split into bf16 hi/lo pairs
T512 float rowX(const uint32_t* meta,const bf* v,const bf* xh,const bf* xl,int nb){
  __m512 a0=_mm512_setzero_ps(),a1=a0;
  for(int k=0;k<nb;++k){uint32_t m=meta[k];
    __m512i r=_mm512_loadu_si512(v); asm("":"+v"(r));
    __m512i e=_mm512_maskz_expand_epi16(m,r);
    a0=_mm512_dpbf16_ps(a0,(__m512bh)e,(__m512bh)_mm512_loadu_si512(xh+32*k));
    a1=_mm512_dpbf16_ps(a1,(__m512bh)e,(__m512bh)_mm512_loadu_si512(xl+32*k));
    v+=_mm_popcnt_u32(m);}
  return _mm512_reduce_add_ps(_mm512_add_ps(a0,a1));}
// X1: vpexpandw + ONE vdpbf16ps, x rounded to bf16 (as a dense bf16 model does); 2 blocks per step,
// 2 accumulators, software prefetch (PF values ahead; 0 = none)
template<int PF>
T512 float rowX1(const uint32_t* meta,const bf* v,const bf* xh,int nb){
  __m512 a0=_mm512_setzero_ps(),a1=a0;int k=0;
  for(;k+1<nb;k+=2){
    if(PF) _mm_prefetch((const char*)(v+PF),_MM_HINT_T0);
    uint32_t m=meta[k],n=meta[k+1];
    __m512i r=_mm512_loadu_si512(v); asm("":"+v"(r)); v+=_mm_popcnt_u32(m);
    __m512i q=_mm512_loadu_si512(v); asm("":"+v"(q)); v+=_mm_popcnt_u32(n);
    a0=_mm512_dpbf16_ps(a0,(__m512bh)_mm512_maskz_expand_epi16(m,r),(__m512bh)_mm512_loadu_si512(xh+32*k));
    a1=_mm512_dpbf16_ps(a1,(__m512bh)_mm512_maskz_expand_epi16(n,q),(__m512bh)_mm512_loadu_si512(xh+32*k+32));}
  for(;k<nb;++k){uint32_t m=meta[k];__m512i r=_mm512_loadu_si512(v); asm("":"+v"(r));
    a0=_mm512_dpbf16_ps(a0,(__m512bh)_mm512_maskz_expand_epi16(m,r),(__m512bh)_mm512_loadu_si512(xh+32*k));v+=_mm_popcnt_u32(m);}
  return _mm512_reduce_add_ps(_mm512_add_ps(a0,a1));}
#define T256 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,popcnt")))
T256 static inline __m256 widen8(const bf* v){return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)v)),16));}
T256 float rowY(const uint32_t* meta,const bf* v,const float* x,int nb){
  __m256 a0=_mm256_setzero_ps(),a1=a0,a2=a0,a3=a0;
  for(int k=0;k<nb;++k){uint32_t m=meta[k];
    uint32_t q0=m&0xff,q1=(m>>8)&0xff,q2=(m>>16)&0xff,q3=m>>24; int c0=_mm_popcnt_u32(q0),c1=c0+_mm_popcnt_u32(q1),c2=c1+_mm_popcnt_u32(q2);
    a0=_mm256_fmadd_ps(_mm256_maskz_expand_ps(q0,widen8(v)),_mm256_loadu_ps(x+32*k),a0);
    a1=_mm256_fmadd_ps(_mm256_maskz_expand_ps(q1,widen8(v+c0)),_mm256_loadu_ps(x+32*k+8),a1);
    a2=_mm256_fmadd_ps(_mm256_maskz_expand_ps(q2,widen8(v+c1)),_mm256_loadu_ps(x+32*k+16),a2);
    a3=_mm256_fmadd_ps(_mm256_maskz_expand_ps(q3,widen8(v+c2)),_mm256_loadu_ps(x+32*k+24),a3);
    v+=_mm_popcnt_u32(m);}
  __m256 s=_mm256_add_ps(_mm256_add_ps(a0,a1),_mm256_add_ps(a2,a3)); float o[8]; _mm256_storeu_ps(o,s); return o[0]+o[1]+o[2]+o[3]+o[4]+o[5]+o[6]+o[7];}
int32_t PERM[256][8] __attribute__((aligned(32))), ZM[256][8] __attribute__((aligned(32)));
T256 static inline __m256 exp8(uint32_t q,const bf* v){ __m256 r=widen8(v); return _mm256_and_ps(_mm256_permutevar8x32_ps(r,_mm256_load_si256((const __m256i*)PERM[q])),_mm256_load_ps((const float*)ZM[q]));}
T256 float rowZ(const uint32_t* meta,const bf* v,const float* x,int nb){
  __m256 a0=_mm256_setzero_ps(),a1=a0,a2=a0,a3=a0;
  for(int k=0;k<nb;++k){uint32_t m=meta[k];
    uint32_t q0=m&0xff,q1=(m>>8)&0xff,q2=(m>>16)&0xff,q3=m>>24; int c0=_mm_popcnt_u32(q0),c1=c0+_mm_popcnt_u32(q1),c2=c1+_mm_popcnt_u32(q2);
    a0=_mm256_fmadd_ps(exp8(q0,v),_mm256_loadu_ps(x+32*k),a0);
    a1=_mm256_fmadd_ps(exp8(q1,v+c0),_mm256_loadu_ps(x+32*k+8),a1);
    a2=_mm256_fmadd_ps(exp8(q2,v+c1),_mm256_loadu_ps(x+32*k+16),a2);
    a3=_mm256_fmadd_ps(exp8(q3,v+c2),_mm256_loadu_ps(x+32*k+24),a3);
    v+=_mm_popcnt_u32(m);}
  __m256 s=_mm256_add_ps(_mm256_add_ps(a0,a1),_mm256_add_ps(a2,a3)); float o[8]; _mm256_storeu_ps(o,s); return o[0]+o[1]+o[2]+o[3]+o[4]+o[5]+o[6]+o[7];}

typedef float (*RowStd)(const uint32_t*,const bf*,const float*,int);
int main(int argc,char**argv){
  if(argc<4){fprintf(stderr,"usage: kernel_variants N K SPARSITY [REPS]\n");return 2;}
  for(int b=0;b<256;++b){int k=0;for(int i=0;i<8;++i){bool on=(b>>i)&1;PERM[b][i]=on?k:0;ZM[b][i]=on?-1:0;k+=on;}}
  int N=atoi(argv[1]),K=atoi(argv[2]);double s=atof(argv[3]);int reps=argc>4?atoi(argv[4]):21;
  if(K%32){fprintf(stderr,"K must be a multiple of 32\n");return 2;}
  M w;w.N=N;w.K=K;w.nb=K/32;std::mt19937 g(1);std::uniform_real_distribution<float> U(-1,1);
  w.meta.resize((size_t)N*w.nb);w.rp.push_back(0);w.ilrp.push_back(0);
  for(int o=0;o<N;++o){for(int b=0;b<w.nb;++b){uint32_t m=0;bf lo[16],hi[16];int nl=0,nh=0;
      for(int j=0;j<32;++j) if(U(g)*0.5f+0.5f>=s){m|=1u<<j;bf q=f2b(U(g));w.vals.push_back(q); if(j<16)lo[nl++]=q; else hi[nh++]=q;}
      w.meta[(size_t)o*w.nb+b]=m;int mx=std::max(nl,nh);
      for(int i=0;i<mx;++i) w.il.push_back((i<nl?lo[i]:0)|(uint32_t(i<nh?hi[i]:0)<<16));}
    w.rp.push_back(w.vals.size());w.ilrp.push_back(w.il.size());}
  for(int i=0;i<64;++i){w.vals.push_back(0);w.il.push_back(0);}
  std::vector<float> x(K);for(auto&v:x)v=U(g);
  std::vector<float> xp(K); std::vector<bf> xh(K),xl(K);
  for(int b=0;b<K/32;++b) for(int L=0;L<4;++L) for(int i=0;i<4;++i){xp[32*b+4*L+i]=x[32*b+8*L+i]; xp[32*b+16+4*L+i]=x[32*b+8*L+4+i];}
  for(int j=0;j<K;++j){xh[j]=f2b(x[j]); uint32_t u=uint32_t(xh[j])<<16; float fh; memcpy(&fh,&u,4); xl[j]=f2b(x[j]-fh);}
  std::vector<double> ref(N),refb(N);  // refb: x rounded to bf16 (the reference for X1)
  for(int o=0;o<N;++o){double acc=0;const bf* v=w.vals.data()+w.rp[o];for(int b=0;b<w.nb;++b){uint32_t m=w.meta[(size_t)o*w.nb+b];for(int j=0;j<32;++j)if(m>>j&1)acc+=double(b2f(*v++))*b2f(xh[32*b+j]);}refb[o]=acc;}
  for(int o=0;o<N;++o){double acc=0;const bf* v=w.vals.data()+w.rp[o];for(int b=0;b<w.nb;++b){uint32_t m=w.meta[(size_t)o*w.nb+b];for(int j=0;j<32;++j)if(m>>j&1)acc+=double(b2f(*v++))*x[32*b+j];}ref[o]=acc;}
  struct Var{const char* name;const char* what;int kind;RowStd f;};
  Var vars[]={
    {"A","zmm widen+vexpandps x2, 2 accumulators (shipped for float32 x: A+pf)",0,rowA},
    {"B","A unrolled over 2 blocks, 4 accumulators",0,rowB},
    {"A+pf","A with software prefetch 1024 values ahead",0,rowAP<1024>},
    {"C","interleaved lo/hi dwords: AND+shift widen (pads max(c0,c1))",1,nullptr},
    {"D","compress x (x2) + merge-expand, one widen+FMA per block",0,rowD},
    {"W","vpexpandw (32 lanes) + unpack widen, x pre-permuted",2,nullptr},
    {"X","vpexpandw + 2x vdpbf16ps, x split into bf16 hi+lo (not exact)",3,nullptr},
    {"X1","vpexpandw + 1x vdpbf16ps, x rounded to bf16, 2 blocks/step",4,nullptr},
    {"X1+pf","X1 with software prefetch 1024 values ahead",5,nullptr},
    {"Y","ymm widen+vexpandps x4 (AVX-512VL)",0,rowY},
    {"Z","ymm permute-table expand x4 (the AVX2 path)",0,rowZ},
    {"P0","probe: A without the expands (wrong result; cost of expand)",0,rowP0},
  };
  const int NV=sizeof(vars)/sizeof(vars[0]);
  std::vector<std::vector<double>> t(NV); std::vector<std::vector<float>> y(NV,std::vector<float>(N));
  for(int r=0;r<reps;++r) for(int vi=0;vi<NV;++vi){auto t0=std::chrono::steady_clock::now();
    for(int o=0;o<N;++o){const uint32_t* mt=w.meta.data()+(size_t)o*w.nb;float res;
      switch(vars[vi].kind){case 1:res=rowC(mt,w.il.data()+w.ilrp[o],x.data(),w.nb);break;
        case 2:res=rowW(mt,w.vals.data()+w.rp[o],xp.data(),w.nb);break;
        case 3:res=rowX(mt,w.vals.data()+w.rp[o],xh.data(),xl.data(),w.nb);break;
        case 4:res=rowX1<0>(mt,w.vals.data()+w.rp[o],xh.data(),w.nb);break;
        case 5:res=rowX1<1024>(mt,w.vals.data()+w.rp[o],xh.data(),w.nb);break;
        default:res=vars[vi].f(mt,w.vals.data()+w.rp[o],x.data(),w.nb);} y[vi][o]=res;}
    t[vi].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count()*1e3);}
  double bytes=w.meta.size()*4.0+w.vals.size()*2.0;
  printf("| variant | what | median ms | vs A | compact GB/s | max rel err |\n|---|---|---|---|---|---|\n");
  for(int vi=0;vi<NV;++vi){std::sort(t[vi].begin(),t[vi].end());double err=0;for(int o=0;o<N;++o){const double r=vars[vi].kind>=4?refb[o]:ref[o];err=std::max(err,std::fabs(y[vi][o]-r)/(1e-3+std::fabs(r)));}
    double med=t[vi][reps/2]; printf("| %s | %s | %.3f | %.2fx | %.1f | %.1e |\n",vars[vi].name,vars[vi].what,med,t[0][reps/2]/med,bytes/med/1e6,err);}
  return 0;
}
